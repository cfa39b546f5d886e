"""Sampling semantics: seeds, stop strings, penalties, top-k/top-p, logprobs, n > 1."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_leaks, hf_greedy

from raysvc import LLM, SamplingParams
from raysvc.engine.sampler import _top_k_top_p


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt[0], block_size=8)


def test_seeded_sampling_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = llm.generate(["The list type"], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    crowd = llm.generate(["x = 1", "The list type", "def f(x):", "Lists may be"],
                         [others, params, others, others])
    assert crowd[1].outputs[0].token_ids == alone
    different_seed = llm.generate(["The list type"], params.model_copy(update={"seed": 99}))
    assert different_seed[0].outputs[0].token_ids != alone
    assert_no_leaks(llm.engine)


def test_stop_string_across_token_boundaries(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate(["The list type"], greedy)[0].outputs[0]
    tok = llm.tokenizer
    # pick a stop string that straddles two generated tokens
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    cut = next(i for i in range(3, len(pieces) - 1)
               if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[cut][-1:] + pieces[cut + 1][len(pieces[cut]):][:2]
    assert stop in full.text
    out = llm.generate(["The list type"], greedy.model_copy(update={"stop": [stop]}))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert out.text == full.text[: full.text.index(stop)]
    kept = llm.generate(["The list type"], greedy.model_copy(
        update={"stop": [stop], "include_stop_str_in_output": True}))[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    assert_no_leaks(llm.engine)


def test_stop_token_ids_and_max_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate([[5, 6, 7]], greedy)[0].outputs[0]
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    out = llm.generate([[5, 6, 7]], greedy.model_copy(update={"stop_token_ids": [stop_id]}))
    assert out[0].outputs[0].token_ids == full.token_ids[: first + 1]
    assert out[0].outputs[0].finish_reason == "stop"
    assert out[0].outputs[0].stop_reason == stop_id


def test_eos_stops_unless_ignored(ckpt):
    path, hf = ckpt
    llm = LLM(path)
    prompt = [9, 10, 11, 12]
    full = hf_greedy(hf, prompt, 20)
    eos = full[3]  # pretend the 4th greedy token is the end of sequence
    llm.engine.eos_token_ids = (eos,)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.token_ids == full[: full.index(eos) + 1] and out.finish_reason == "stop"
    ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                    ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == full
    min_tok = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                    min_tokens=10))[0].outputs[0]
    assert len(min_tok.token_ids) >= 10 and eos not in min_tok.token_ids[:9]


def test_logprobs_match_hf_log_softmax(ckpt, llm):
    path, hf = ckpt
    prompt = [3, 4, 5, 6, 7]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0], -1)
    for i, (token, lps) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert lps[token].rank == 1
        assert abs(lps[token].logprob - row[token].item()) < 1e-4
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(lps)
        assert len(lps) == 3
    chosen = [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs, strict=True)]
    assert out.cumulative_logprob == pytest.approx(sum(chosen))


def test_penalties_against_reference(ckpt, llm):
    """Greedy with penalties equals a hand-penalised greedy loop over HF's logits."""
    path, hf = ckpt
    prompt = [5, 5, 5, 9, 9, 11, 12, 13]
    rep, freq, pres = 3.0, 2.0, 2.0
    expected: list[int] = []
    for _ in range(16):
        with torch.no_grad():
            row = hf(torch.tensor([prompt + expected])).logits[0, -1].clone()
        seen = torch.tensor(sorted(set(prompt + expected)))
        row[seen] = torch.where(row[seen] > 0, row[seen] / rep, row[seen] * rep)
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long),
                                minlength=row.numel()).float()
        row -= freq * counts + pres * (counts > 0).float()
        expected.append(int(row.argmax()))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=rep,
                            frequency_penalty=freq, presence_penalty=pres)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == expected
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert plain[0].outputs[0].token_ids != expected  # the penalties changed something


def test_top_k_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    out = _top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.5]))
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isfinite(out[1]).sum() == 2  # the smallest prefix reaching mass 0.5


def test_sampling_distribution_matches_probabilities(llm):
    """Exponential-race sampling draws from softmax(logits / T) (chi-square-ish check)."""
    engine = llm.engine
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0] + [-1e9] * (engine.model_config.vocab_size - 4)])
    probs = torch.softmax(logits[0, :4], -1)
    from raysvc.engine.sequence import Request

    req = Request("x", None, [1], SamplingParams(temperature=1.0, seed=7), ())
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[engine.sampler(logits.clone(), [req.seqs[0]]).token_ids[0]] += 1
    assert torch.allclose(counts / 4000, probs, atol=0.03)


def test_n_samples_share_prompt_blocks(ckpt):
    path, _ = ckpt
    llm = LLM(path, block_size=8)
    prompt = list(range(3, 3 + 21))  # 21 tokens: 2 full blocks + a partial one
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 10 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # the prompt was computed once, not four times
    assert llm.stats()["num_computed_tokens"] == len(prompt) + 4 * 9
    # each sample equals a single-sample run with the same per-sample seed
    for o in out.outputs:
        single = llm.generate([prompt], params.model_copy(update={"n": 1, "seed": 3 + o.index}))
        assert single[0].outputs[0].token_ids == o.token_ids
    greedy = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=6,
                                                   ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in greedy.outputs}) == 1
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 7}])
def test_prompt_logprobs_match_hf(ckpt, kw):
    """Each prompt token's logprob given the ones before it, also across prefill chunks
    and with the prompt already in the prefix cache."""
    path, hf = ckpt
    llm = LLM(path, block_size=8, **kw)
    prompt = [3, 9, 4, 17, 5, 6, 11, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 2, 7]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))  # warm the cache
    out = llm.generate([prompt], params)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[prompt[i]].logprob - ref[i - 1, prompt[i]].item()) < 1e-4
        assert entry[prompt[i]].rank == int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
        assert set(ref[i - 1].topk(2).indices.tolist()) <= set(entry)
    assert_no_leaks(llm.engine)
