"""The control plane's own ceiling: admissions per second through the Router actor.

    raysvc bench router                          # 8 fake workers, 4 client actors
    raysvc bench router --workers 64 --clients 8 --in-flight 256 --duration 20

A real `Router` actor with `--workers` fake worker actors (no engine: each answers the
router's calls — info, health, load reports, KV events — with a roomy, idle worker) and
`--clients` client actors, each keeping `--in-flight` requests admitted at once: acquire
(with a prompt of `--prompt-tokens` token ids, so placement hashes blocks as it does for
real requests), hold for `--hold-ms`, release, repeat. Reported: admitted requests/s
over the run, and the admission latency (acquire's round trip) p50 / p99, per client
actor and in all. `--plot` draws admissions per second over time.

This is the measure of issue [router-scale] (goal: >= 10,000 admissions/s on this
machine); what it printed is in docs/perf.md with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time


class FakeWorker:
    """A worker that the router sees as idle with plenty of room, forever."""

    def __init__(self, worker_id: str, seats: int, blocks: int) -> None:
        from raysvc.cluster.messages import WorkerInfo

        self.info_ = WorkerInfo(worker_id, "fake-node", os.getpid(), "cpu", "fake", 1 << 20,
                                32000, 16, blocks, seats)

    def info(self):
        return self.info_

    def health(self) -> bool:
        return True

    def requests(self) -> list:
        return []

    def load(self):
        from raysvc.cluster.messages import WorkerLoad

        return WorkerLoad(kv_blocks_free=self.info_.kv_blocks_total,
                          kv_blocks_total=self.info_.kv_blocks_total)

    async def kv_events(self, epoch: str, acked_step: int, wait_s: float = 1.0):
        from raysvc.cluster.messages import KVEventsReply

        await asyncio.sleep(wait_s)
        return KVEventsReply(epoch="fake", step=0, snapshot=set())


class Client:
    """Keeps `in_flight` requests admitted: acquire, hold, release, again."""

    def __init__(self, router, index: int) -> None:
        self.router, self.index = router, index

    async def run(self, duration_s: float, in_flight: int, prompt_tokens: int,
                  hold_s: float) -> dict:
        latencies: list[float] = []
        per_second: dict[int, int] = {}
        start = time.monotonic()
        end = start + duration_s
        counter = 0

        async def loop(slot: int) -> None:
            nonlocal counter
            while time.monotonic() < end:
                counter += 1
                ticket_id = f"c{self.index}-{slot}-{counter}"
                prompt = [(self.index * 7919 + counter * 31 + i) % 32000
                          for i in range(prompt_tokens)]
                t = time.monotonic()
                await self.router.acquire.remote(ticket_id, prompt_tokens, 1, prompt)
                done = time.monotonic()
                latencies.append(done - t)
                second = int(done - start)
                per_second[second] = per_second.get(second, 0) + 1
                if hold_s:
                    await asyncio.sleep(hold_s)
                self.router.release.remote(ticket_id)

        await asyncio.gather(*(loop(s) for s in range(in_flight)))
        return {"admitted": len(latencies), "seconds": time.monotonic() - start,
                "latencies": latencies, "per_second": per_second}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysvc bench router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--clients", type=int, default=4, help="client actors")
    p.add_argument("--in-flight", type=int, default=64, help="requests per client at once")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--hold-ms", type=float, default=0.0, help="how long a ticket is held")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--plot", default=None, help="PNG of admissions per second")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from raysvc.cluster.launch import start_router

    ray.init(address="local", num_cpus=args.num_cpus or max(os.cpu_count() or 1, 2),
             include_dashboard=False, logging_level="warning")
    try:
        seats = 1 << 16  # never the limit: the router's own cost is what is measured
        router = start_router(max_queue_len=1 << 16)
        workers = [ray.remote(FakeWorker).options(num_cpus=0, max_concurrency=64).remote(
            f"fake-{i}", seats, 1 << 24) for i in range(args.workers)]
        for i, w in enumerate(workers):
            ray.get(router.add_worker.remote(f"fake-{i}", w), timeout=60)
        clients = [ray.remote(Client).options(num_cpus=0, max_concurrency=4).remote(router, i)
                   for i in range(args.clients)]
        results = ray.get([c.run.remote(args.duration, args.in_flight, args.prompt_tokens,
                                         args.hold_ms / 1000) for c in clients],
                          timeout=args.duration + 600)
    finally:
        ray.shutdown()

    admitted = sum(r["admitted"] for r in results)
    seconds = max(r["seconds"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    per_second: dict[int, int] = {}
    for r in results:
        for s, n in r["per_second"].items():
            per_second[s] = per_second.get(s, 0) + n
    report = {
        "command": "raysvc bench router " + " ".join(argv if argv is not None else sys.argv[2:]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "admitted": admitted, "admitted_per_s": round(admitted / seconds, 1),
        "latency_p50_ms": round(1000 * _pct(latencies, 0.5), 2),
        "latency_p99_ms": round(1000 * _pct(latencies, 0.99), 2),
        "per_second": [per_second.get(s, 0) for s in range(int(seconds) + 1)],
    }
    print(f"command: {report['command']}\nmachine: {report['machine']}; date: {report['date']}")
    print(f"{args.workers} fake workers, {args.clients} clients x {args.in_flight} in flight, "
          f"{args.prompt_tokens}-token prompts, hold {args.hold_ms:g} ms")
    print(f"admitted {admitted} in {seconds:.1f}s: {report['admitted_per_s']} requests/s; "
          f"admission latency p50 {report['latency_p50_ms']} ms, "
          f"p99 {report['latency_p99_ms']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(range(len(report["per_second"])), report["per_second"])
        ax.set_xlabel("second")
        ax.set_ylabel("admissions / s")
        ax.set_title(f"Router: {args.workers} fake workers, {args.clients} clients")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
