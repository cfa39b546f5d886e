"""[kv-fabric] step 2 on a real (one-node) Ray cluster: a request placed on worker B while
worker A holds its prompt's prefix pulls those blocks from A through Ray instead of
recomputing them; the output equals A's (greedy), and nothing is leaked on either side.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import fresh_ray

from raysvc.block_hash import hash_blocks

BLOCK = 16


@pytest.fixture(scope="module")
def fabric():
    from raysvc.cluster import WorkerSpec, add_workers, start_router

    ray = fresh_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        # balance at any difference in load: the worker that served a prompt last is the
        # busier one, so its next request goes to the other, which must pull
        router = start_router(health_interval_s=0.3, events_wait_s=0.3,
                              placement={"balance_abs": 0.0, "balance_rel": 0.0})
        # the built-in model, in fp32: a prefill costs enough here that the workers' cost
        # models call a pull of its blocks faster (a 64-wide test model's would not)
        spec = WorkerSpec(engine_kwargs={"num_kv_blocks": 128, "dtype": "float32",
                                         "block_size": BLOCK, "max_num_batched_tokens": 512},
                          num_cpus=0, torch_threads=1)
        workers = add_workers(router, spec, 2, timeout_s=300)
        yield ray, router, workers
    finally:
        ray.shutdown()


def _run(router, request_id: str, prompt: list[int]) -> list[int]:
    from raysvc.cluster import ClusterClient

    async def main():
        tokens = []
        params = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
        async for chunk in ClusterClient(router).generate(request_id, prompt, params):
            for d in chunk.deltas:
                tokens += d.token_ids
        return tokens

    return asyncio.run(asyncio.wait_for(main(), 120))


def _stats(ray, router) -> dict[str, dict]:
    return {w["worker_id"]: w for w in ray.get(router.stats.remote(), timeout=60)["workers"]}


def test_a_prefix_on_another_worker_is_pulled_not_recomputed(fabric):
    ray, router, workers = fabric
    prompt = [3 + (i * 7) % 400 for i in range(300)]
    hashes = hash_blocks(prompt[:-1], BLOCK)
    first = _run(router, "first", prompt)
    holder = next(w for w, s in _stats(ray, router).items() if s["requests_routed"])
    deadline = time.monotonic() + 30  # the router learns the holder's blocks (KV events)
    while not set(hashes) <= ray.get(router.index_hashes.remote(holder), timeout=30):
        assert time.monotonic() < deadline, "the router never saw the holder's blocks"
        time.sleep(0.2)
    # both workers' cost models are in (load reports): a pull of 18 blocks beats a prefill
    deadline = time.monotonic() + 30
    while not all(s["kv_bytes_per_s"] for s in _stats(ray, router).values()):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    second = _run(router, "second", prompt)
    assert second == first
    stats = _stats(ray, router)
    puller = next(w for w in stats if w != holder)
    assert stats[puller]["requests_routed"] == 1
    assert stats[puller]["kv_pull_blocks"] == len(hashes)
    assert stats[puller]["kv_pull_bytes"] > 0 and stats[puller]["kv_pull_failures"] == 0
    assert stats[puller]["prefix_cache_hits"] == len(hashes) * BLOCK  # recomputes avoided
    for s in stats.values():  # nothing held: every block free (or cached, evictable)
        assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["requests_in_flight"] == 0
    # the holder again (now the less busy one), from its own cache: the same tokens
    assert _run(router, "third", prompt) == first
    assert _stats(ray, router)[holder]["prefix_cache_hits"] == len(hashes) * BLOCK
