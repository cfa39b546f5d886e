"""Speculative decoding: lossless (greedy identical, sampled distribution unchanged),
no leaked blocks, and the parts checked against plain references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_no_leaks

from raysvc import LLM, SamplingParams
from raysvc.engine.spec.ngram import NgramProposer
from raysvc.engine.spec.rejection import verify_greedy, verify_sampled

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = ["The list type", "A dictionary is a", "def f(x):\n    return", "The while"]
# explicit pools: on a GPU the default (90% of its memory) leaves nothing for the next LLM
KV_BLOCKS = 512


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    n = counts.sum()
    expected = probs * n
    big = expected >= 5  # merge the rare bins, as the chi-square approximation needs
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    crit = chi2_critical(int(keep.sum()) - 1)
    return stat < crit, stat, crit


@pytest.fixture(scope="module")
def base():
    return LLM(dtype="float32", num_kv_blocks=KV_BLOCKS)


@pytest.mark.parametrize("spec", [
    {"method": "draft_model", "num_speculative_tokens": 4, "adaptive": False},
    {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False},
    {"method": "draft_model", "num_speculative_tokens": 2},  # adaptive
])
def test_greedy_identical_on_builtin_pair(base, spec):
    expected = [o.outputs[0].token_ids for o in base.generate(PROMPTS, GREEDY)]
    llm = LLM(dtype="float32", speculative_config=spec, max_num_batched_tokens=64,
              num_kv_blocks=KV_BLOCKS)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    assert 1 <= stats["spec_mean_accepted_length"] <= spec["num_speculative_tokens"] + 1
    assert_no_leaks(llm.engine)
    assert not llm.engine.spec.proposer.__dict__.get("mirrors")


def test_greedy_identical_with_unrelated_draft(make_checkpoint):
    """A draft that never agrees (acceptance ~ 0) still changes nothing."""
    target, _ = make_checkpoint("llama", seed=0)
    draft, _ = make_checkpoint("llama", seed=1)
    prompts = [[5, 6, 7], list(range(3, 40)), [9] * 17]
    expected = LLM(target, num_kv_blocks=KV_BLOCKS).generate(prompts, GREEDY)
    llm = LLM(target, speculative_config={"method": "draft_model", "model": draft,
                                          "num_speculative_tokens": 3, "adaptive": False},
              num_kv_blocks=12, block_size=8)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert llm.stats()["spec_acceptance_rate"] < 0.3
    assert llm.stats()["num_preemptions"] > 0  # proposals survive preemption too
    assert_no_leaks(llm.engine)


def test_sampled_distribution_matches_target(make_checkpoint):
    """Chi-square: tokens 2 and 3 (both produced by speculative steps) follow the target's
    exact marginals, computed by enumerating every context with HF transformers."""
    target, hf = make_checkpoint("llama", seed=0, vocab_size=12, tokenizer=False)
    draft, _ = make_checkpoint("llama", seed=7, vocab_size=12, tokenizer=False)
    prompt = [3, 4, 5]
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    llm = LLM(target, speculative_config={"method": "draft_model", "model": draft,
                                          "num_speculative_tokens": 2, "adaptive": False},
              max_num_seqs=512, num_kv_blocks=4096)
    outs = llm.generate([prompt] * 3000, params)
    tokens = torch.tensor([o.outputs[0].token_ids for o in outs])
    assert llm.stats()["spec_draft_tokens"] > 0
    assert 0.05 < llm.stats()["spec_acceptance_rate"] < 0.95  # both paths exercised
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1).double()
        ctx2 = torch.tensor([prompt + [a] for a in range(12)])
        p2 = torch.softmax(hf(ctx2).logits[:, -1], -1).double()  # [t1, t2]
        ctx3 = torch.tensor([prompt + [a, b] for a in range(12) for b in range(12)])
        p3 = torch.softmax(hf(ctx3).logits[:, -1], -1).double().view(12, 12, 12)
    marg2 = (p1[:, None] * p2).sum(0)
    marg3 = (p1[:, None, None] * p2[:, :, None] * p3).sum((0, 1))
    for position, marginal in ((1, marg2), (2, marg3)):
        counts = torch.bincount(tokens[:, position], minlength=12).double()
        ok, stat, crit = chi2_ok(counts, marginal)
        assert ok, f"token {position + 1}: chi2 {stat:.1f} >= {crit:.1f}"
    assert_no_leaks(llm.engine)


def test_rejection_sampler_is_exact():
    """Monte Carlo over the verifier alone: the first emitted token follows p exactly."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, 6, generator=g) * 2, -1)
    counts = torch.zeros(6)
    for _ in range(6000):
        d = int(torch.multinomial(q[0], 1, generator=g))
        counts[verify_sampled(p, [d], q, g)[0]] += 1
    ok, stat, crit = chi2_ok(counts.double(), p[0].double())
    assert ok, (stat, crit)
    one_hot = torch.zeros(6)
    for _ in range(6000):
        one_hot[verify_sampled(p, [2], None, g)[0]] += 1
    assert chi2_ok(one_hot.double(), p[0].double())[0]


def test_verify_greedy_accepts_matching_prefix():
    logits = torch.full((4, 10), -5.0)
    for i, best in enumerate([3, 1, 4, 1]):
        logits[i, best] = 5.0
    assert verify_greedy(logits, [3, 1, 4]) == [3, 1, 4, 1]  # all accepted + bonus
    assert verify_greedy(logits, [3, 2, 4]) == [3, 1]  # recovered at the first mismatch
    assert verify_greedy(logits, [0, 1, 4]) == [3]


def test_ngram_lookup():
    from raysvc.engine.sampling_params import SamplingParams as SP
    from raysvc.engine.sequence import Request

    seq = Request("r", None, [1, 2, 3, 4, 5, 9, 2, 3], SP(), ()).seqs[0]
    proposer = NgramProposer(1, 3)
    assert proposer.propose([seq], [3])[0].tokens == [4, 5, 9]
    seq.token_ids = [7, 8, 9]
    assert proposer.propose([seq], [3]) == [None]


def test_abort_while_speculating_frees_everything():
    llm = LLM(dtype="float32", speculative_config={"method": "draft_model",
                                                  "num_speculative_tokens": 3, "adaptive": False},
              num_kv_blocks=KV_BLOCKS)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.8, max_tokens=60,
                                                           ignore_eos=True, seed=i))
    for _ in range(4):
        engine.step()
    engine.abort("r1")
    engine.abort("r2")
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)
    proposer = engine.spec.proposer
    assert not proposer.mirrors
    assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks


def test_seeded_speculative_sampling_is_reproducible():
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=30, seed=42,
                            ignore_eos=True)
    a = LLM(dtype="float32", speculative_config=spec,
            num_kv_blocks=KV_BLOCKS).generate(PROMPTS[:1], params)
    b = LLM(dtype="float32", speculative_config=spec,
            num_kv_blocks=KV_BLOCKS).generate(PROMPTS, params)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


@pytest.mark.parametrize("bad, field", [
    ({"method": "medusa"}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "model": "x"}, "model"),
    ({"method": "draft_model", "bogus": 1}, "bogus"),
    ("ngram", "speculative_config"),
])
def test_bad_speculative_config(bad, field):
    with pytest.raises(ValueError, match=field):
        LLM(speculative_config=bad)
