"""[router] on a real 3-node Ray cluster: prefix-aware placement, failover, drain.

Node 0 (head) holds the router; nodes 1 and 2 each run one worker (`raysvc_worker`
resource) with a small KV pool, so a random workload both stores and evicts prefixes.
Checks: the router's per-worker index equals each worker's actual cached hashes after a
random workload; 16 greedy streams survive a worker being killed mid-stream with exactly
the tokens of an undisturbed run, and the restarted worker re-joins; a drained worker
moves its streams to the other node with their KV (live migration), takes no new
requests and leaves.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from conftest import fresh_ray

ENGINE = {"num_kv_blocks": 48, "max_num_seqs": 8, "max_num_batched_tokens": 512}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from raysvc.cluster import WorkerSpec, add_workers, start_router

    ray = fresh_ray()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, resources={"raysvc_worker": 1})
        ray.init(address=c.address, logging_level="warning")
        c.wait_for_nodes(timeout=120)
        router = start_router(health_interval_s=0.5, events_wait_s=0.5)
        spec = WorkerSpec(engine_kwargs=ENGINE, num_cpus=0, resources={"raysvc_worker": 1},
                          torch_threads=1, max_restarts=1)
        workers = add_workers(router, spec, 2, timeout_s=300)
        yield ray, router, workers
    finally:
        ray.shutdown()
        c.shutdown()


def _generate(router, prompts, max_tokens, on_token=None, stagger_s=0.0):
    """Run prompts concurrently; per prompt, its tokens or the exception it raised."""
    from raysvc.cluster import ClusterClient

    async def main():
        client = ClusterClient(router)

        async def one(i, prompt):
            await asyncio.sleep(i * stagger_s)
            tokens = []
            try:
                params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
                async for chunk in client.generate(f"r{i}-{time.monotonic_ns()}", prompt, params):
                    for delta in chunk.deltas:
                        tokens += delta.token_ids
                    if on_token is not None:
                        on_token(i, len(tokens))
                return tokens
            except Exception as e:  # noqa: BLE001 - the test inspects it
                return e

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(asyncio.wait_for(main(), 240))


def _wait_consistent(ray, router, workers, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        diffs = {}
        for wid, handle in workers.items():
            actual = ray.get(handle.cached_block_hashes.remote(), timeout=30)
            mirrored = ray.get(router.index_hashes.remote(wid), timeout=30)
            if actual != mirrored:
                diffs[wid] = (len(actual), len(mirrored), len(actual ^ mirrored))
        if not diffs or time.monotonic() > deadline:
            return diffs
        time.sleep(0.2)


def test_index_matches_workers_after_random_workload(cluster):
    ray, router, workers = cluster
    from raysvc.block_hash import hash_blocks

    rng = random.Random(8)
    groups = [[rng.randrange(3, 500) for _ in range(64)] for _ in range(4)]
    prompts = [rng.choice(groups) + [rng.randrange(3, 500) for _ in range(rng.randrange(16, 70))]
               for _ in range(40)]
    distinct = {h for p in prompts for h in hash_blocks(p, 16)}
    assert len(distinct) > 2 * ENGINE["num_kv_blocks"]  # both pools must evict, too
    results = _generate(router, prompts, max_tokens=6, stagger_s=0.02)
    assert all(isinstance(r, list) and len(r) == 6 for r in results), results
    assert _wait_consistent(ray, router, workers) == {}
    stats = ray.get(router.stats.remote(), timeout=60)
    assert stats["index_size"] > 0 and stats["placement"] == "prefix"
    assert sum(w["prefix_cache_hits"] for w in stats["workers"]) > 0, stats
    assert all(w["index_blocks"] <= w["kv_blocks_total"] for w in stats["workers"])


def test_failover_keeps_16_greedy_streams_exact(cluster, caplog):
    ray, router, workers = cluster
    caplog.set_level("WARNING", logger="raysvc.cluster.client")
    from raysvc import LLM, SamplingParams

    prompts = [[7 + i, 20 + i, 9, 30, 31, 32 + i] for i in range(16)]
    expected = [o.outputs[0].token_ids for o in LLM(num_kv_blocks=256).generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))]
    old_pid = ray.get(router.workers.remote(), timeout=30)["worker-0"].pid
    progress: dict[int, int] = {}
    killed: list[bool] = []

    def on_token(i: int, n: int) -> None:
        progress[i] = n
        if len(progress) == 16 and min(progress.values()) >= 2 and not killed:
            killed.append(True)
            ray.kill(workers["worker-0"], no_restart=False)

    results = _generate(router, prompts, max_tokens=40, on_token=on_token)
    assert killed, "the kill never happened"
    assert results == expected
    # streams that were on the victim (each >= 2 tokens in at the kill) were re-dispatched
    failovers = [r for r in caplog.records if "failed during" in r.getMessage()]
    assert failovers and all("worker-0" in r.getMessage() for r in failovers)
    deadline = time.monotonic() + 120  # the restarted actor re-joins the router by itself
    while time.monotonic() < deadline:
        infos = ray.get(router.workers.remote(), timeout=30)
        if "worker-0" in infos and infos["worker-0"].pid != old_pid:
            break
        time.sleep(0.5)
    assert infos["worker-0"].pid != old_pid, infos
    assert _wait_consistent(ray, router, workers) == {}


def test_drained_worker_migrates_its_streams_takes_no_more_and_leaves(cluster):
    """[kv-fabric] step 4 across two nodes: the drained worker's running streams move to
    the other worker with their KV (live migration) and go on token-identical to an
    undisturbed run, recomputing nothing; new requests avoid it; it leaves, empty."""
    ray, router, workers = cluster
    from raysvc import LLM, SamplingParams
    from raysvc.cluster import ClusterClient

    prompts = [[40 + i] + list(range(41, 41 + 20 + 9 * i)) for i in range(8)]
    lengths = [200] * 4 + [30] * 4  # the early ones outlive the drain's start
    expected = [LLM(num_kv_blocks=256).generate([p], SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
        for p, n in zip(prompts, lengths, strict=True)]

    def by_worker() -> dict[str, dict]:
        return {w["worker_id"]: w for w in ray.get(router.stats.remote(), timeout=60)["workers"]}

    before = by_worker()
    migrated = ray.get(router.stats.remote(), timeout=60)["requests_migrated"]

    async def main():
        client = ClusterClient(router)

        async def one(i: int, started: asyncio.Event) -> list[int]:
            tokens: list[int] = []
            params = {"temperature": 0.0, "max_tokens": lengths[i], "ignore_eos": True}
            async for chunk in client.generate(f"d{i}-{time.monotonic_ns()}", prompts[i],
                                               params):
                tokens += [t for d in chunk.deltas for t in d.token_ids]
                started.set()
            return tokens

        events = [asyncio.Event() for _ in range(8)]
        early = [asyncio.create_task(one(i, events[i])) for i in range(4)]
        await asyncio.gather(*(e.wait() for e in events[:4]))
        running = (await router.stats.remote())["workers"]
        victim = max(running, key=lambda w: w["requests_admitted"])["worker_id"]
        drain = router.drain_worker.remote(victim, 120)
        stats = await router.stats.remote()  # ordered after the drain's start
        (at_drain,) = [w for w in stats["workers"] if w["worker_id"] == victim]
        late = [asyncio.create_task(one(i, events[i])) for i in range(4, 8)]
        return await asyncio.gather(*early, *late), await drain, at_drain

    results, drained, at_drain = asyncio.run(asyncio.wait_for(main(), 240))
    assert results == expected
    victim = at_drain["worker_id"]
    (other,) = set(workers) - {victim}
    held = at_drain["requests_admitted"]
    assert at_drain["draining"] and drained is True and held >= 1, at_drain
    stats = ray.get(router.stats.remote(), timeout=60)
    assert stats["requests_migrated"] - migrated == held
    after = by_worker()
    assert list(after) == [other]  # the drained worker left
    w, b = after[other], before[other]
    # every late request, and each migrated stream's continuation, went to the other
    assert w["requests_routed"] - b["requests_routed"] == 8
    assert w["kv_migrations_in"] - b["kv_migrations_in"] == held
    assert w["kv_migration_failures"] == b["kv_migration_failures"]
    assert w["kv_tokens_carried"] > b["kv_tokens_carried"]
    assert w["kv_blocks_free"] == w["kv_blocks_total"] and w["requests_in_flight"] == 0
    _wait_for_metrics(ray, ("raysvc_kv_migrations", "raysvc_kv_tokens_carried"))
    ray.get(router.add_worker.remote(victim, workers[victim]), timeout=60)
    assert len(ray.get(router.workers.remote(), timeout=30)) == 2


def _wait_for_metrics(ray, names: tuple[str, ...]) -> None:
    """Every metric of `names` shows on some node's Prometheus endpoint (as Ray exports
    the router's records), with a non-zero sample."""
    import urllib.request

    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n["Alive"]]
    deadline, missing = time.monotonic() + 60, list(names)
    while missing and time.monotonic() < deadline:
        text = "".join(urllib.request.urlopen(u, timeout=10).read().decode() for u in urls)
        samples = [line for line in text.splitlines() if not line.startswith("#")]
        missing = [n for n in names if not any(
            line.startswith(f"ray_{n}_total") and float(line.split()[-1]) > 0
            for line in samples)]
        time.sleep(1)
    assert not missing, missing
