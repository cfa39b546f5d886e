"""Routing benchmark: prefix-aware placement vs round-robin vs least-loaded vs an oracle.

    python -m raysvc.bench.routing            # CPU, built-in model, ~2 minutes

One local multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head node for the
router and the driver, one node per worker). The workload is G prefix groups (a long
shared prefix: a system prompt, a document) x U users (each a short suffix of their own),
arriving at random (Poisson, fixed seed) in random order. Each policy gets a fresh router
and fresh workers (empty caches) and the identical request schedule, one after another
in the same run. The KV pool is kept small, so a worker cannot hold every group's prefix:
where requests are placed decides what the caches hold.

Per policy: prefix hit rate (cached prompt tokens / prompt tokens looked up, from the
workers' own counters), TTFT p50/p99 (arrival -> first token, as the client sees it),
throughput (output tokens/s over the run), and load imbalance (max/min requests routed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

POLICIES = ("prefix", "round_robin", "least_loaded", "oracle")


@dataclass(slots=True)
class Request:
    at: float  # seconds after the start
    group: int
    prompt: list[int]


def make_workload(groups: int, users: int, prefix_len: int, suffix_len: int, rate: float,
                  seed: int) -> list[Request]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(prefix_len)] for _ in range(groups)]
    pairs = [(g, u) for g in range(groups) for u in range(users)]
    rng.shuffle(pairs)
    t, out = 0.0, []
    for g, _ in pairs:
        t += rng.expovariate(rate)
        out.append(Request(t, g, prefixes[g] + [rng.randrange(3, 500) for _ in range(suffix_len)]))
    return out


async def _run(router: Any, workload: list[Request], max_tokens: int) -> tuple[list[float], float]:
    """Send the workload on its schedule; TTFTs (s) and the wall time of the whole run."""
    from raysvc.cluster import ClusterClient

    client = ClusterClient(router)
    params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    start = time.monotonic()

    async def one(i: int, req: Request) -> float:
        await asyncio.sleep(max(start + req.at - time.monotonic(), 0.0))
        sent, first = time.monotonic(), None
        async for _ in client.generate(f"bench-{i}", req.prompt, params):
            first = first or time.monotonic()
        return (first or time.monotonic()) - sent

    ttfts = await asyncio.gather(*(one(i, r) for i, r in enumerate(workload)))
    return list(ttfts), time.monotonic() - start


def _counters(ray: Any, router: Any) -> dict[str, tuple[int, int, int]]:
    stats = ray.get(router.stats.remote(), timeout=60)
    return {w["worker_id"]: (w["prefix_cache_hits"], w["prefix_cache_queries"],
                             w["requests_routed"]) for w in stats["workers"]}


def bench_policy(ray: Any, policy: str, args: argparse.Namespace,
                 workload: list[Request]) -> dict[str, float]:
    from raysvc.cluster import WorkerSpec, add_workers, start_router

    router = start_router(health_interval_s=0.5, events_wait_s=0.2,
                          placement={**args.placement, "policy": policy})
    engine = {"num_kv_blocks": args.kv_blocks, "max_num_seqs": args.max_seqs,
              "max_num_batched_tokens": 1024}
    spec = WorkerSpec(engine_kwargs=engine, num_cpus=0, resources={"raysvc_worker": 1},
                      torch_threads=1)
    workers = add_workers(router, spec, args.workers, prefix=policy, timeout_s=300)
    try:
        warm = [Request(0.0, -1, [3 + i] * 20) for i in range(args.workers)]
        asyncio.run(_run(router, warm, 2))  # first steps are slow; not counted below
        before = _counters(ray, router)
        ttfts, wall = asyncio.run(_run(router, workload, args.max_tokens))
        time.sleep(0.5)
        after = _counters(ray, router)
    finally:
        for handle in workers.values():
            ray.kill(handle)
        ray.kill(router)
    hits = sum(after[w][0] - before[w][0] for w in after)
    queries = sum(after[w][1] - before[w][1] for w in after)
    routed = [after[w][2] - before[w][2] for w in after]
    ttfts.sort()
    return {"hit_rate": hits / max(queries, 1),
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(int(0.99 * len(ttfts)), len(ttfts) - 1)],
            "tok_s": len(workload) * args.max_tokens / wall,
            "imbalance": max(routed) / max(min(routed), 1), "routed": routed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--suffix-len", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=8.0, help="requests/s (Poisson)")
    p.add_argument("--kv-blocks", type=int, default=64, help="per worker (block size 16)")
    p.add_argument("--max-seqs", type=int, default=8, help="per worker")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement", nargs="*", default=[], metavar="KEY=VALUE",
                   help="PlacementConfig overrides, e.g. balance_abs=8 load_weight=0.5")
    args = p.parse_args(argv)
    args.placement = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.placement)}

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(args.workers):
            cluster.add_node(num_cpus=1, resources={"raysvc_worker": 1})
        ray.init(address=cluster.address, logging_level="warning")
        cluster.wait_for_nodes(timeout=120)
        workload = make_workload(args.groups, args.users, args.prefix_len, args.suffix_len,
                                 args.rate, args.seed)
        results = {pol: bench_policy(ray, pol, args, workload)
                   for pol in args.policies.split(",")}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{args.workers} workers x {args.kv_blocks} KV blocks, {args.groups} groups x "
          f"{args.users} users, prefix {args.prefix_len} + suffix {args.suffix_len} tokens, "
          f"{args.max_tokens} output tokens, {args.rate} req/s\n")
    print("| policy | prefix hit rate | TTFT p50 (ms) | TTFT p99 (ms) | output tok/s "
          "| max/min load | requests per worker |")
    print("|---|---|---|---|---|---|---|")
    for pol, r in results.items():
        print(f"| {pol} | {r['hit_rate']:.3f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
              f"| {r['tok_s']:.1f} | {r['imbalance']:.2f} | {r['routed']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
