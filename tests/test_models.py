"""raysvc's own forward pass and engine against Hugging Face transformers, per architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, assert_no_leaks, hf_greedy

from raysvc import LLM, SamplingParams
from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
from raysvc.engine.sequence import Request

PROMPT_LENS = (5, 17, 40, 3, 64, 9, 23, 31, 100)


def random_prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def prefill_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every prompt position, from one batched prefill through the paged pool."""
    engine = llm.engine
    batch = SchedulerOutput()
    requests = [Request(f"r{i}", None, p, SamplingParams(), ()) for i, p in enumerate(prompts)]
    for r in requests:
        engine.block_manager.allocate_slots(r.seqs[0], len(r.prompt_token_ids))
        batch.scheduled.append(ScheduledSeq(r.seqs[0], len(r.prompt_token_ids)))
    ids, pos, meta = engine.runner.device_inputs(engine.runner.prepare(batch))
    hidden = engine.runner.model.forward(ids, pos, engine.runner.kv_cache.layers, meta,
                                         engine.runner.backend)
    logits = engine.runner.model.compute_logits(hidden)
    for r in requests:
        engine.block_manager.free(r.seqs[0])
    return list(logits.split([len(p) for p in prompts]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_logits_match_hf(make_checkpoint, arch):
    path, hf = make_checkpoint(arch)
    llm = LLM(path, block_size=8)
    prompts = random_prompts(hf.config.vocab_size)
    ours = prefill_logits(llm, prompts)
    for prompt, logits in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["batched", "chunked", "preempt"])
def test_greedy_matches_hf_generate(make_checkpoint, arch, mode):
    path, hf = make_checkpoint(arch)
    kwargs = {"batched": {},
              "chunked": {"max_num_batched_tokens": 24},
              "preempt": {"num_kv_blocks": 28, "block_size": 8, "max_num_batched_tokens": 64}}
    llm = LLM(path, **kwargs[mode])
    prompts = random_prompts(hf.config.vocab_size)
    max_new = 20
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new,
                                                ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, max_new)
        assert out.outputs[0].finish_reason == "length"
    if mode == "preempt":
        assert llm.stats()["num_preemptions"] > 0
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("variant", [
    dict(num_key_value_heads=1),  # MQA
    dict(num_key_value_heads=4),  # MHA
    dict(tie_word_embeddings=True),
    dict(attention_bias=True),  # Llama's bias on q/k/v/o
])
def test_llama_variants(make_checkpoint, variant):
    path, hf = make_checkpoint("llama", **variant)
    llm = LLM(path)
    prompts = random_prompts(hf.config.vocab_size)[:4]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    assert_no_leaks(llm.engine)


def test_sharded_checkpoint(make_checkpoint):
    path, hf = make_checkpoint("qwen2", shard=True)
    import os

    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    llm = LLM(path)
    prompt = random_prompts(hf.config.vocab_size)[2]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 10)
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_hf(make_checkpoint, dtype):
    path, hf = make_checkpoint("llama")
    llm = LLM(path, dtype=dtype)
    assert llm.engine.dtype == getattr(torch, dtype)
    prompts = random_prompts(hf.config.vocab_size)[:3]
    ours = prefill_logits(llm, prompts)
    ref_model = type(hf)(hf.config).eval()
    ref_model.load_state_dict(hf.state_dict())
    ref_model.to(getattr(torch, dtype))
    for prompt, logits in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = ref_model(torch.tensor([prompt])).logits[0].float()
        assert (logits - ref).abs().max() < 0.1 * ref.abs().max()


def test_unsupported_architecture_names_it(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_warm_up_leaves_no_trace(make_checkpoint):
    """The start-up warm-up (run on CUDA to compile every Triton variant) borrows blocks,
    returns them all, caches nothing, and changes no output."""
    from raysvc.engine.model_runner import warm_up

    path, hf = make_checkpoint("llama")
    llm = LLM(path, block_size=8)
    warm_up(llm.engine.runner, llm.engine.block_manager, 200)
    assert_no_leaks(llm.engine)
    assert llm.stats()["kv_blocks_cached"] == 0 and not llm.engine.block_manager.drain_events()
    prompt = random_prompts(hf.config.vocab_size)[1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 8)
