"""Rebalancing on real workers (local Ray): a burst lands on the only worker, whose engine
keeps most of it waiting (a small token budget); a second worker joins, and the requests
that had not started there move to it at once — through the worker's `shed`, the
clients' hand-over path and `avoid` — with every greedy output equal to the offline
engine's, and both workers' KV fully free afterwards."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import fresh_ray

# 16 tokens a step: 16 decoding requests fill it, the rest wait in the engine
ENGINE = {"num_kv_blocks": 512, "max_num_seqs": 64, "max_num_batched_tokens": 16,
          "dtype": "float32"}  # bf16 greedy can flip near-ties with the batch's shape
PROMPTS = [[5 + i, 6, 7, 8, 9, 10, 11, 12] for i in range(40)]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def ray_local():
    ray = fresh_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def test_a_joining_worker_takes_the_backlog_that_had_not_started(ray_local):
    ray = ray_local
    from raysvc import LLM, SamplingParams
    from raysvc.cluster import ClusterClient, WorkerSpec, start_router
    from raysvc.cluster.launch import start_worker

    router = start_router(health_interval_s=0.3)
    spec = WorkerSpec(engine_kwargs=ENGINE, num_cpus=0, torch_threads=1)
    first, second = (start_worker(f"w{i}", spec) for i in range(2))
    ray.get([first.info.remote(), second.info.remote()], timeout=300)  # both loaded
    ray.get(router.add_worker.remote("w0", first), timeout=60)

    results: list = []

    def burst():
        async def main():
            client = ClusterClient(router)

            async def one(i, prompt):
                tokens = []
                params = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
                async for chunk in client.generate(f"r{i}", prompt, params):
                    for delta in chunk.deltas:
                        tokens += delta.token_ids
                return tokens

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

        results.extend(asyncio.run(asyncio.wait_for(main(), 240)))

    thread = threading.Thread(target=burst)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the router's reports show the backlog
        rows = ray.get(router.stats.remote(), timeout=60)["workers"]
        if rows and rows[0]["waiting"] >= 10:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no backlog formed: {rows}")
    ray.get(router.add_worker.remote("w1", second), timeout=60)
    thread.join(240)
    assert not thread.is_alive()

    stats = ray.get(router.stats.remote(), timeout=60)
    by_id = {w["worker_id"]: w for w in stats["workers"]}
    assert stats["requests_rebalanced"] >= 5, stats
    assert by_id["w1"]["requests_routed"] >= 5, by_id
    expected = LLM(**ENGINE).generate(PROMPTS, SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert results == [e.outputs[0].token_ids for e in expected]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = ray.get(router.stats.remote(), timeout=60)["workers"]
        if all(w["kv_blocks_free"] == w["kv_blocks_total"] and not w["requests_admitted"]
               for w in rows):
            break
        time.sleep(0.2)
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in rows), rows
    assert all(w["requests_admitted"] == 0 for w in rows), rows
