"""[kv-fabric] step 3: the host tier under the KV pool. Prefix blocks evicted from a small
device pool are kept in host memory and come back, bit-exact, as hits; without the tier
they are recomputed. References: the engine's own bytes before eviction, its own first
answer, and a fresh engine."""

from __future__ import annotations

import torch
from conftest import assert_no_leaks

from raysvc import LLM, SamplingParams
from raysvc.block_hash import hash_blocks

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
BLOCK = 8


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (57,), generator=g).tolist() for _ in range(n)]


def test_evicted_prefixes_come_back_from_the_host_tier(make_checkpoint):
    path, _ = make_checkpoint("llama")
    a, *others = _prompts(4)
    hashes = hash_blocks(a[:-1], BLOCK)  # 7 blocks
    results = {}
    for offload in (0, 1 << 20):
        llm = LLM(path, block_size=BLOCK, num_kv_blocks=16, kv_offload_bytes=offload)
        (first,) = llm.generate([a], GREEDY)
        before = llm.engine.export_kv(hashes)
        llm.generate(others, GREEDY)  # three more prompts: a's blocks are evicted
        assert llm.engine.block_manager.cached_run(hashes) == []
        hits = llm.stats()["prefix_cache_hits"]
        (again,) = llm.generate([a], GREEDY)
        stats = llm.stats()
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        results[offload] = (stats["prefix_cache_hits"] - hits, stats["prefix_cache_hits_host"])
        if offload:
            after = llm.engine.export_kv(hashes)
            assert after.num_blocks == len(hashes)
            assert (after.data == before.data).all()  # the same bytes came back
            assert stats["kv_host_blocks"] > 0
        assert_no_leaks(llm.engine)
    assert results[0] == (0, 0)  # no tier: recomputed
    assert results[1 << 20] == (len(hashes) * BLOCK, len(hashes) * BLOCK)


def test_the_tier_is_bounded_and_least_recently_used_goes_first(make_checkpoint):
    path, _ = make_checkpoint("llama")
    llm = LLM(path, block_size=BLOCK, num_kv_blocks=16, kv_offload_bytes=1)
    tier = llm.engine.block_manager.host
    assert tier.capacity_blocks == 0  # less than a block: keeps nothing
    llm = LLM(path, block_size=BLOCK, num_kv_blocks=16)
    assert llm.engine.block_manager.host is None  # off by default on CPU
    llm = LLM(path, block_size=BLOCK, num_kv_blocks=16, kv_offload_bytes=1 << 20)
    tier = llm.engine.block_manager.host
    tier.capacity_blocks = 5
    llm.generate(_prompts(4), GREEDY)
    assert tier.num_blocks == 5 and tier.spills > 5
    assert_no_leaks(llm.engine)


def test_a_reload_that_pushes_its_own_blocks_out_of_a_full_tier_still_lands(make_checkpoint):
    """Reloading takes device blocks, which evicts other prefixes into the tier, which drops
    its oldest entries -- possibly the very chain being reloaded. It was copied first."""
    path, _ = make_checkpoint("llama")
    a, b, c = _prompts(3)
    llm = LLM(path, block_size=BLOCK, num_kv_blocks=16, kv_offload_bytes=1 << 20)
    llm.engine.block_manager.host.capacity_blocks = 8
    (first,) = llm.generate([a], GREEDY)
    llm.generate([b], GREEDY)
    llm.generate([c], GREEDY)  # a's blocks now in the full tier, b's still on the device
    (again,) = llm.generate([a], GREEDY)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.stats()["prefix_cache_hits_host"] > 0
    assert_no_leaks(llm.engine)
