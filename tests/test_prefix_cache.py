"""Prefix caching: same outputs with it on and off, exact hit accounting, tenant salts,
eviction, and a KV event stream that mirrors the cache exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_leaks, hf_greedy

from raysvc import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("llama", max_position_embeddings=1024)


def shared_prefix_prompts(n_prefixes=3, users=4, prefix_len=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(3, 500, (prefix_len,), generator=g).tolist()
                for _ in range(n_prefixes)]
    return [p + torch.randint(3, 500, (5 + 3 * u,), generator=g).tolist()
            for p in prefixes for u in range(users)]


@pytest.mark.parametrize("kw", [
    {},
    {"max_num_batched_tokens": 16},  # chunked prefill
    {"num_kv_blocks": 24, "block_size": 8, "max_num_batched_tokens": 48},  # preemption
])
def test_outputs_identical_with_and_without_caching(ckpt, kw):
    path, hf = ckpt
    prompts = shared_prefix_prompts()
    kw = {"block_size": 8, **kw}
    off = LLM(path, enable_prefix_caching=False, **kw)
    on = LLM(path, enable_prefix_caching=True, **kw)
    # twice through the cached engine: the second pass hits what the first one left
    expected = [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY)]
    computed = []
    for _ in range(2):
        before = on.stats()["num_computed_tokens"]
        got = [o.outputs[0].token_ids for o in on.generate(prompts, GREEDY)]
        assert got == expected
        computed.append(on.stats()["num_computed_tokens"] - before)
    assert expected[0] == hf_greedy(hf, prompts[0], 8)
    stats = on.stats()
    assert stats["prefix_cache_hits"] > 0
    assert computed[0] <= off.stats()["num_computed_tokens"]
    if "num_kv_blocks" in kw:
        assert stats["num_preemptions"] > 0  # a small pool: preempted requests hit their prefix
    else:
        assert computed[1] < computed[0]
    assert_no_leaks(on.engine)
    assert_no_leaks(off.engine)


def test_shared_512_token_prefix_computes_only_the_suffix(ckpt):
    path, _ = ckpt
    llm = LLM(path, block_size=16)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 500, (512,), generator=g).tolist()
    a = prefix + torch.randint(3, 500, (20,), generator=g).tolist()
    b = prefix + torch.randint(3, 500, (37,), generator=g).tolist()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([a], one)
    before = llm.stats()
    llm.generate([b], one)
    after = llm.stats()
    assert after["num_computed_tokens"] - before["num_computed_tokens"] == 37
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(b)
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 512
    # the same prompt again: every full block hits but the last token is recomputed
    llm.generate([b], one)
    last = llm.stats()
    hit = (len(b) - 1) // 16 * 16
    assert last["prefix_cache_hits"] - after["prefix_cache_hits"] == hit
    assert last["num_computed_tokens"] - after["num_computed_tokens"] == len(b) - hit
    # another tenant's salt: no block is shared
    salted = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, cache_salt="tenant-2")
    llm.generate([b], salted)
    salt = llm.stats()
    assert salt["prefix_cache_hits"] == last["prefix_cache_hits"]
    assert salt["num_computed_tokens"] - last["num_computed_tokens"] == len(b)
    assert llm.generate([b], salted)[0].outputs[0].token_ids == \
        llm.generate([b], one)[0].outputs[0].token_ids
    assert_no_leaks(llm.engine)
    assert llm.stats()["kv_blocks_cached"] > 0


def test_eviction_pressure_and_event_replay(ckpt):
    path, hf = ckpt
    llm = LLM(path, block_size=8, num_kv_blocks=30, max_num_batched_tokens=64)
    mirror: set[bytes] = set()
    batches = []

    def on_events(batch):
        batches.append(batch)
        for event in batch.events:
            if event.kind == "stored":
                mirror.update(event.block_hashes)
            else:
                mirror.difference_update(event.block_hashes)

    llm.engine.subscribe_kv_events(on_events)
    for seed in range(3):  # far more distinct prefixes than the pool holds
        prompts = shared_prefix_prompts(n_prefixes=4, users=2, prefix_len=40, seed=seed)
        outs = llm.generate(prompts, GREEDY)
        for prompt, out in list(zip(prompts, outs, strict=True))[:2]:
            assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 8)
        assert mirror == llm.engine.cached_block_hashes()
    assert any(e.kind == "removed" for b in batches for e in b.events)
    assert [b.step for b in batches] == sorted({b.step for b in batches})
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["kv_blocks_cached"] == len(mirror) > 0
    assert_no_leaks(llm.engine)


def test_n_samples_share_prompt_and_later_requests_hit(ckpt):
    path, _ = ckpt
    llm = LLM(path, block_size=8)
    prompt = list(range(3, 3 + 40))
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6,
                                                ignore_eos=True))[0]
    assert len(out.outputs) == 3
    assert llm.stats()["num_computed_tokens"] == 40 + 3 * 5
    llm.generate([prompt], GREEDY)
    assert llm.stats()["prefix_cache_hits"] == 32
    assert_no_leaks(llm.engine)
