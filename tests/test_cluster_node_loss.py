"""[resilience] node loss on a real multi-node Ray cluster: `remove_node` of the node that
holds a worker, then of the node that holds the router, while greedy streams run.

Nodes: the head (driver only), two `control` nodes (the router may run on either: when
its node goes, Ray restarts it on the other) and three worker nodes (`raysvc_worker`, one
worker each; the pool keeps two). The router and workers are an application's named,
detached actors, as the Serve app makes them. Every accepted stream must finish with the
tokens of an undisturbed run, and new requests must be served after each loss.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import fresh_ray

ENGINE = {"num_kv_blocks": 128, "max_num_seqs": 8, "dtype": "float32"}
PARAMS = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 120}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from raysvc.cluster import WorkerSpec, start_router
    from raysvc.cluster.launch import AppNames

    ray = fresh_ray()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        control = [c.add_node(num_cpus=1, resources={"control": 1}) for _ in range(2)]
        workers = [c.add_node(num_cpus=1, resources={"raysvc_worker": 1}) for _ in range(3)]
        ray.init(address=c.address, logging_level="warning")
        c.wait_for_nodes(timeout=120)
        names = AppNames("raysvc.nodeloss")
        spec = WorkerSpec(engine_kwargs=ENGINE, num_cpus=0, resources={"raysvc_worker": 1},
                          torch_threads=1, max_restarts=0, names=names)
        router = start_router(resources={"control": 1}, health_interval_s=0.5,
                              events_wait_s=0.5, worker_spec=spec, min_workers=2,
                              max_workers=2, names=names, report_timeout_s=3,
                              autoscaling={"metrics_interval_s": 0.5,
                                           "worker_start_timeout_s": 240})
        assert ray.get(router.start_workers.remote(2, 240), timeout=300) == 2
        yield ray, c, router, names, control, workers
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def prompts():
    return [[11 + i, 200 + 7 * i, 31, 5, 900 + i] for i in range(8)]


@pytest.fixture(scope="module")
def expected(prompts):
    from raysvc import LLM, SamplingParams

    outs = LLM(num_kv_blocks=512, dtype="float32").generate(prompts, SamplingParams(**PARAMS))
    return [o.outputs[0].token_ids for o in outs]


def _node_of(ray, handle) -> str:
    from ray._private.state import actors

    return actors(actor_id=handle._actor_id.hex())["Address"]["NodeID"]


def _run(ray, names, prompts, during=None):
    """Stream every prompt through a fresh client; call `during()` once all have output."""
    from raysvc.cluster import ClusterClient

    async def main():
        client = ClusterClient(names.get(names.router), resolve=lambda: names.get(names.router))
        progress: dict[int, int] = {}
        fired = asyncio.Event()

        async def one(i, prompt):
            tokens = []
            async for chunk in client.generate(f"n{i}-{time.monotonic_ns()}", prompt, PARAMS):
                for d in chunk.deltas:
                    tokens += d.token_ids
                progress[i] = len(tokens)
                if during and not fired.is_set() and len(progress) == len(prompts) \
                        and min(progress.values()) >= 4:
                    fired.set()
                    await asyncio.to_thread(during)
            return tokens

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(asyncio.wait_for(main(), 300))


def test_losing_a_worker_node_loses_no_stream(cluster, prompts, expected):
    ray, c, router, names, _, worker_nodes = cluster
    workers = names.workers_alive()
    victim_node = _node_of(ray, workers["worker-0"])
    node = next(n for n in worker_nodes if n.node_id == victim_node)
    assert _run(ray, names, prompts, during=lambda: c.remove_node(node)) == expected
    deadline = time.monotonic() + 180  # the pool replaces the lost worker on the spare node
    while True:
        stats = ray.get(router.stats.remote(), timeout=30)
        if stats["ready_workers"] == 2:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(1.0)
    assert "worker-0" not in {w["worker_id"] for w in stats["workers"]}
    assert _run(ray, names, prompts) == expected


def test_losing_the_router_node_loses_no_stream(cluster, prompts, expected):
    ray, c, router, names, control_nodes, _ = cluster
    old_node = _node_of(ray, router)
    node = next(n for n in control_nodes if n.node_id == old_node)
    before = set(names.workers_alive())
    assert _run(ray, names, prompts, during=lambda: c.remove_node(node)) == expected
    deadline = time.monotonic() + 120  # restarted on the other control node, rebuilt
    last: object = None
    while True:
        try:
            stats = last = ray.get(router.stats.remote(), timeout=30)
            if stats["ready_workers"] == 2:
                break
        except Exception as e:  # restarting
            last = e
        assert time.monotonic() < deadline, last
        time.sleep(1.0)
    assert _node_of(ray, router) != old_node
    assert {w["worker_id"] for w in stats["workers"]} == before  # adopted, not replaced
    assert _run(ray, names, prompts) == expected  # and it serves again
    deadline = time.monotonic() + 30  # releases lost in the restart are reconciled away
    while True:
        rows = ray.get(router.stats.remote(), timeout=30)["workers"]
        if not any(w["requests_admitted"] for w in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(1.0)
