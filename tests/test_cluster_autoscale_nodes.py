"""[autoscale] with Ray's autoscaler: a pending worker brings a node, and the node goes
away once the pool has drained the worker off it.

The cluster starts with a head only (it holds the router: `control`); worker nodes
(`raysvc_worker`, up to 2) exist only while something needs them — Ray's fake multi-node
provider starts them as local raylets (see autoscaling_cluster.py for why not Ray's own
AutoscalingCluster), and removes one after 6 s idle. A pool of 1..2 starts 2 workers: they
stay pending until the autoscaler adds their nodes; with no traffic the pool drains one
after its downscale delay, and Ray then releases that node.
"""

from __future__ import annotations

import time

import pytest
from autoscaling_cluster import LocalAutoscalingCluster
from conftest import fresh_ray

KNOBS = {"upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "look_back_period_s": 0.5,
         "metrics_interval_s": 0.25, "worker_start_timeout_s": 240}


def _worker_nodes(ray) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and "raysvc_worker" in n["Resources"])


@pytest.mark.slow
def test_pending_worker_adds_a_node_and_scale_down_releases_it():
    from raysvc.cluster import WorkerSpec, start_router

    ray = fresh_ray()
    c = LocalAutoscalingCluster(
        head_resources={"CPU": 1, "control": 1},
        worker_node_types={"gpu_like": {"resources": {"CPU": 1, "raysvc_worker": 1},
                                        "node_config": {}, "min_workers": 0,
                                        "max_workers": 2}},
        idle_timeout_minutes=0.1)
    try:
        ray.init(address=c.start(), logging_level="warning")
        assert _worker_nodes(ray) == 0
        spec = WorkerSpec(engine_kwargs={"num_kv_blocks": 32, "max_num_seqs": 4}, num_cpus=0,
                          resources={"raysvc_worker": 1}, torch_threads=1)
        router = start_router(resources={"control": 1}, worker_spec=spec, min_workers=1,
                              max_workers=2, autoscaling=KNOBS, health_interval_s=0.5)
        start = time.monotonic()
        # both workers are pending (no node has raysvc_worker) until Ray adds two nodes
        assert ray.get(router.start_workers.remote(2, 240), timeout=300) == 2
        grew_after = time.monotonic() - start
        assert _worker_nodes(ray) == 2
        stats = ray.get(router.stats.remote(), timeout=30)
        assert len({w["node_id"] for w in stats["workers"]}) == 2  # one per new node

        # idle: after the downscale delay the pool drains to 1; 6 s later the node goes
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _worker_nodes(ray) > 1:
            time.sleep(1.0)
        stats = ray.get(router.stats.remote(), timeout=30)
        assert _worker_nodes(ray) == 1, ray.nodes()
        assert stats["ready_workers"] == 1 and stats["target_workers"] == 1
        assert any("peak demand" in d["reason"] for d in stats["scaling_decisions"])
        print(f"nodes added and workers ready after {grew_after:.1f}s")
    finally:
        ray.shutdown()
        c.shutdown()
