"""The control plane's own ceiling: admissions per second through the Router actor.

    raysvc bench router                          # 8 fake workers, 4 client actors
    raysvc bench router --workers 64 --clients 8 --in-flight 256 --duration 20

A real `Router` actor with `--workers` fake worker actors (no engine: each answers the
router's calls — info, health, load reports, KV events — with a roomy, idle worker) and
`--clients` client actors (stand-ins for ingress processes), each keeping `--in-flight`
requests admitted at once: hash the prompt's blocks (`--prompt-tokens` token ids, as the
ingress does), acquire, hold for `--hold-ms`, release, repeat. Two protocols, one after
the other in one run (`--protocol both`, the default): "batched", through the ingress's
own `TicketBatcher` (one `Router.exchange` call in flight per process, carrying every
acquire and release made meanwhile), and "per-request", one Router call per acquire and
per release (the protocol before batching: the reference). Reported per protocol:
admitted requests/s, admission latency (hash + acquire) p50 / p99, requests per router
call; and the ratio. `--plot` draws admissions per second over time.

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

PROTOCOLS = ("batched", "per-request")


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
    """Keeps `in_flight` requests admitted: acquire, hold, release, again — through the
    ingress's own `TicketBatcher` ("batched"), or one Router call per acquire and per
    release ("per-request": the protocol before batching, the reference)."""

    def __init__(self, router, index: int) -> None:
        self.router, self.index = router, index

    async def run(self, duration_s: float, in_flight: int, prompt_tokens: int,
                  hold_s: float, protocol: str, block_size: int = 16) -> dict:
        from raysvc.block_hash import hash_blocks
        from raysvc.cluster.messages import AcquireRequest
        from raysvc.cluster.tickets import TicketBatcher

        batcher = TicketBatcher(self.router)
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
                # the ingress hashes the prompt's blocks (its cost is counted here)
                hashes = hash_blocks(prompt[:-1], block_size)
                if protocol == "batched":
                    await batcher.acquire(AcquireRequest(ticket_id, prompt_tokens, 1, hashes))
                else:
                    await self.router.acquire.remote(ticket_id, prompt_tokens, 1, hashes)
                done = time.monotonic()
                latencies.append(done - t)
                second = int(done - start)
                per_second[second] = per_second.get(second, 0) + 1
                if hold_s:
                    await asyncio.sleep(hold_s)
                if protocol == "batched":
                    batcher.release(ticket_id)
                else:
                    self.router.release.remote(ticket_id)

        await asyncio.gather(*(loop(s) for s in range(in_flight)))
        return {"admitted": len(latencies), "seconds": time.monotonic() - start,
                "latencies": latencies, "per_second": per_second,
                "calls": batcher.calls if protocol == "batched" else 2 * len(latencies)}


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
    p.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both",
                   help="batched (the ingress's TicketBatcher), per-request (one Router "
                        "call per acquire and per release: the reference), or both, one "
                        "after the other, with their ratio")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--plot", default=None, help="PNG of admissions per second")
    p.add_argument("--json", default=None)
    return p


def decisions_alone(num_workers: int, prompt_tokens: int, count: int = 20000,
                    batch: int = 64) -> float:
    """Admissions/s of the Router's own work — queue, placement, ledger — with no Ray:
    `exchange` called in process in batches of `batch` (each releasing the previous
    batch), against idle fake workers. The ceiling batching can approach."""
    from raysvc.block_hash import hash_blocks
    from raysvc.cluster.messages import AcquireRequest
    from raysvc.cluster.router import Router

    class _Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            result = self.fn(*args)
            if asyncio.iscoroutine(result):
                return asyncio.ensure_future(result)
            future = asyncio.get_running_loop().create_future()
            future.set_result(result)
            return future

    class Idle(FakeWorker):
        def __init__(self, worker_id: str) -> None:
            super().__init__(worker_id, 1 << 16, 1 << 24)
            for name in ("info", "health", "requests", "load", "kv_events"):
                setattr(self, name, _Method(getattr(FakeWorker, name).__get__(self)))

    async def run() -> float:
        router = Router(health_interval_s=3600)
        for i in range(num_workers):
            await router.add_worker(f"fake-{i}", Idle(f"fake-{i}"))
        requests = []
        for k in range(count):
            prompt = [(k * 31 + i) % 32000 for i in range(prompt_tokens)]
            requests.append(AcquireRequest(f"t{k}", prompt_tokens, 1,
                                           hash_blocks(prompt[:-1], 16)))
        released: list[str] = []
        start = time.perf_counter()
        for i in range(0, count, batch):
            reply = await router.exchange("bench", requests[i:i + batch], released)
            released = [t for t, _ in reply.results]
        return count / (time.perf_counter() - start)

    async def timed() -> float:
        try:
            return await run()
        finally:
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

    return asyncio.run(timed())


def _phase(ray, args, protocol: str) -> dict:
    """One protocol's run: a fresh router, its fake workers, the clients."""
    from raysvc.cluster.launch import start_router

    seats = 1 << 16  # never the limit: the router's own cost is what is measured
    router = start_router(max_queue_len=1 << 16)
    workers = [ray.remote(FakeWorker).options(num_cpus=0, max_concurrency=64).remote(
        f"fake-{i}", seats, 1 << 24) for i in range(args.workers)]
    for i, w in enumerate(workers):
        ray.get(router.add_worker.remote(f"fake-{i}", w), timeout=60)
    clients = [ray.remote(Client).options(num_cpus=0, max_concurrency=4).remote(router, i)
               for i in range(args.clients)]
    results = ray.get([c.run.remote(args.duration, args.in_flight, args.prompt_tokens,
                                     args.hold_ms / 1000, protocol) for c in clients],
                      timeout=args.duration + 600)
    for actor in [router, *workers, *clients]:
        ray.kill(actor)
    admitted = sum(r["admitted"] for r in results)
    seconds = max(r["seconds"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    per_second: dict[int, int] = {}
    for r in results:
        for s, n in r["per_second"].items():
            per_second[s] = per_second.get(s, 0) + n
    calls = sum(r["calls"] for r in results)
    return {
        "admitted": admitted, "admitted_per_s": round(admitted / seconds, 1),
        "latency_p50_ms": round(1000 * _pct(latencies, 0.5), 2),
        "latency_p99_ms": round(1000 * _pct(latencies, 0.99), 2),
        "router_calls": calls, "requests_per_call": round(admitted / max(calls, 1), 2),
        "per_second": [per_second.get(s, 0) for s in range(int(seconds) + 1)],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    ray.init(address="local", num_cpus=args.num_cpus or max(os.cpu_count() or 1, 2),
             include_dashboard=False, logging_level="warning")
    try:
        phases = {p: _phase(ray, args, p) for p in protocols}
    finally:
        ray.shutdown()

    report = {
        "decisions_alone_per_s": round(decisions_alone(args.workers, args.prompt_tokens)),
        "command": "raysvc bench router " + " ".join(argv if argv is not None else sys.argv[2:]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), **phases,
    }
    if len(phases) == 2:
        report["ratio"] = round(phases["batched"]["admitted_per_s"]
                                / max(phases["per-request"]["admitted_per_s"], 1e-9), 2)
    print(f"command: {report['command']}\nmachine: {report['machine']}; date: {report['date']}")
    print(f"{args.workers} fake workers, {args.clients} clients x {args.in_flight} in flight, "
          f"{args.prompt_tokens}-token prompts, hold {args.hold_ms:g} ms")
    for protocol, r in phases.items():
        print(f"{protocol:>12}: admitted {r['admitted']}: {r['admitted_per_s']} requests/s; "
              f"admission latency p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} "
              f"ms; {r['requests_per_call']} requests per router call")
    if "ratio" in report:
        print(f"batched / per-request: {report['ratio']}x")
    print(f"the router's own work alone (in process, no Ray, batches of 64): "
          f"{report['decisions_alone_per_s']} admissions/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        for protocol, r in phases.items():
            ax.plot(range(len(r["per_second"])), r["per_second"], label=protocol)
        ax.set_xlabel("second")
        ax.set_ylabel("admissions / s")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"Router: {args.workers} fake workers, {args.clients} clients")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
