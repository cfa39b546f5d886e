"""Router + two workers on a real 3-node Ray cluster (`ray.cluster_utils.Cluster`).

Node 0 (head) holds the router; nodes 1 and 2 each advertise one `raysvc_worker`
resource, so each gets one worker. The driver plays the ingress through `ClusterClient`.
Checks: both workers serve, greedy tokens equal the offline engine's, and when one worker
is killed its queued requests go to the other and its in-flight ones continue there.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import fresh_ray

ENGINE = {"num_kv_blocks": 128, "max_num_seqs": 2, "max_num_batched_tokens": 256}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from raysvc.cluster import WorkerSpec, add_workers, start_router

    ray = fresh_ray()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"metrics_report_interval_ms": 1000}})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, resources={"raysvc_worker": 1})
        ray.init(address=c.address, logging_level="warning")
        c.wait_for_nodes(timeout=120)
        router = start_router(health_interval_s=0.5)
        spec = WorkerSpec(engine_kwargs=ENGINE, num_cpus=0, resources={"raysvc_worker": 1},
                          torch_threads=1)
        workers = add_workers(router, spec, 2, timeout_s=300)
        yield ray, router, workers, c
    finally:
        ray.shutdown()
        c.shutdown()


def _generate(router, prompts, max_tokens, on_first=None):
    """Run prompts concurrently; per prompt, its tokens or the exception it raised."""
    from raysvc.cluster import ClusterClient

    async def main():
        client = ClusterClient(router)

        async def one(i, prompt):
            tokens = []
            try:
                params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
                async for chunk in client.generate(f"req-{i}-{time.monotonic_ns()}", prompt,
                                                   params):
                    if not tokens and on_first is not None:
                        on_first(i)
                    for delta in chunk.deltas:
                        tokens += delta.token_ids
                return tokens
            except Exception as e:  # noqa: BLE001 - the test inspects it
                return e

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(asyncio.wait_for(main(), 240))


def test_two_workers_on_two_nodes_both_serve(cluster):
    ray, router, workers, _ = cluster
    from raysvc import LLM, SamplingParams

    infos = ray.get(router.workers.remote(), timeout=60)
    assert len({i.node_id for i in infos.values()}) == 2  # one worker per node
    prompts = [[5 + i, 6, 7, 8, 9] for i in range(6)]
    results = _generate(router, prompts, max_tokens=12)
    expected = LLM(num_kv_blocks=64).generate(prompts, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True))
    assert results == [e.outputs[0].token_ids for e in expected]
    stats = ray.get(router.stats.remote(), timeout=60)
    assert all(w["requests_routed"] >= 1 for w in stats["workers"]), stats
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in stats["workers"]), stats


def test_metrics_are_exported(cluster):
    import urllib.request

    nodes = cluster[3].list_all_nodes()
    urls = [f"http://{n.node_ip_address}:{n.metrics_export_port}/metrics" for n in nodes]
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = ""
        for url in urls:  # the router's gauges come out of the node it runs on
            with urllib.request.urlopen(url, timeout=10) as r:
                text += r.read().decode()
        if "raysvc_kv_cache_usage_perc" in text:
            break
        time.sleep(1)
    assert "raysvc_kv_cache_usage_perc" in text and "raysvc_num_requests_running" in text


def test_killed_worker_requests_all_finish_on_the_other(cluster):
    ray, router, workers, _ = cluster
    # 2 seats per worker: 4 requests run, 4 wait in the router's queue.
    prompts = [[10 + i, 11, 12, 13] for i in range(8)]
    started: set[int] = set()
    victim = workers["worker-0"]
    killed_at: list[set[int]] = []

    def on_first(i: int) -> None:
        started.add(i)
        if len(started) == 4 and not killed_at:
            admitted = ray.get(router.stats.remote(), timeout=30)
            on_victim = [w for w in admitted["workers"] if w["worker_id"] == "worker-0"]
            killed_at.append(set(started))
            assert on_victim and on_victim[0]["requests_admitted"] == 2
            ray.kill(victim)

    results = _generate(router, prompts, max_tokens=300, on_first=on_first)
    assert killed_at, "the kill never happened"
    # in-flight ones fail over (prompt + tokens so far), queued ones go to the survivor
    assert all(isinstance(r, list) and len(r) == 300 for r in results), results
    stats = ray.get(router.stats.remote(), timeout=60)
    assert [w["worker_id"] for w in stats["workers"]] == ["worker-1"]
    (w,) = stats["workers"]
    assert w["kv_blocks_free"] == w["kv_blocks_total"] and w["requests_admitted"] == 0
