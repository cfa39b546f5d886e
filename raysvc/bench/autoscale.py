"""Autoscaling benchmark: one step load, three worker pools, side by side.

    raysvc bench autoscale                          # elastic 1..3 vs fixed 1 vs fixed 3
    raysvc bench autoscale --phases 0.5:60,6:40,0.5:100 --min-workers 1 --max-workers 3

The same Poisson step load (rate:seconds per phase: low -> high -> low) of streaming
greedy completions runs against three local servers in turn: the elastic pool
(`--min-workers`..`--max-workers`, knobs from `--worker-autoscaling`), a fixed pool of
the minimum and a fixed pool of the maximum. For each it reports TTFT p50/p99 (all
requests, and those of the high phase), requests failed, output tokens/s, and
worker-seconds (workers holding resources — starting, ready or draining — integrated
over the run from /cluster/stats, polled every half second). The goal for the elastic
pool: TTFT p99 within 1.5x of the fixed maximum while using <= 60% of its worker-seconds,
with no failed request. With `--plot`, a PNG shows the offered load, each pool's workers
and every request's TTFT over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field

from raysvc.bench.serve import Result, _free_port, _pct, http_session, stream_completion


@dataclass
class Run:
    name: str
    results: list[Result] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # seconds from the load's start
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    # (t, ready, starting, draining, target) from /cluster/stats

    def worker_seconds(self) -> float:
        """Workers holding resources (starting + ready + draining), integrated over time."""
        total = 0.0
        for (t0, r, s, d, _), (t1, *_rest) in zip(self.samples, self.samples[1:], strict=False):
            total += (r + s + d) * (t1 - t0)
        return total


def parse_phases(text: str) -> list[tuple[float, float]]:
    """"0.5:60,6:40" -> [(0.5 req/s, 60 s), (6 req/s, 40 s)]."""
    phases = []
    for part in text.split(","):
        rate, _, seconds = part.partition(":")
        try:
            phases.append((float(rate), float(seconds)))
        except ValueError:
            raise ValueError(f"--phases: {part!r} is not RATE:SECONDS") from None
        if phases[-1][0] < 0 or phases[-1][1] <= 0:
            raise ValueError(f"--phases: {part!r}: rate must be >= 0 and seconds > 0")
    return phases


def arrivals(phases: list[tuple[float, float]], seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start) of a piecewise-constant rate."""
    rng, times, start = random.Random(seed), [], 0.0
    for rate, seconds in phases:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            times.append(t)
        start += seconds
    return times


async def _load(url: str, model: str, run: Run, prompts: list[list[int]], output_len: int,
                times: list[float], poll_s: float) -> None:
    async with http_session() as session:
        start = time.perf_counter()
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                try:
                    async with session.get(url + "/cluster/stats") as resp:
                        st = await resp.json()
                    states = [w.get("state", "ready") for w in st["workers"]]
                    run.samples.append((time.perf_counter() - start, states.count("ready"),
                                        states.count("starting"), states.count("draining"),
                                        st.get("target_workers", len(states))))
                except Exception:  # a slow stats call is a gap in the curve, not a failure
                    pass
                await asyncio.sleep(poll_s)

        async def one(i: int) -> Result:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            return await stream_completion(session, url, model, prompts[i], output_len)

        poller = asyncio.create_task(poll())
        run.arrivals = list(times)
        run.results = list(await asyncio.gather(*(one(i) for i in range(len(times)))))
        await asyncio.sleep(poll_s * 2)  # the pool's last samples
        stop.set()
        await poller


def run_pool(name: str, serve_args, prompts, output_len, times, poll_s, num_cpus) -> Run:
    from raysvc.serve import launcher

    url = launcher.start(serve_args, port=_free_port(), num_cpus=num_cpus)
    run = Run(name)
    try:
        asyncio.run(_load(url, serve_args.model_name(), run, prompts, output_len, times,
                          poll_s))
    finally:
        launcher.stop(local=True)
    return run


def summarize(run: Run, high: tuple[float, float]) -> dict:
    ok = [r for r in run.results if r.ok]
    in_high = [r.ttft for r, t in zip(run.results, run.arrivals, strict=True)
               if r.ok and high[0] <= t < high[1]]
    seconds = max((s[0] for s in run.samples), default=1.0)
    return {
        "name": run.name, "requests": len(run.results), "failed": len(run.results) - len(ok),
        "ttft_p50_ms": 1000 * _pct([r.ttft for r in ok], 50),
        "ttft_p99_ms": 1000 * _pct([r.ttft for r in ok], 99),
        "high_ttft_p99_ms": 1000 * _pct(in_high, 99),
        "output_tok_s": sum(r.output_tokens for r in ok) / seconds,
        "worker_seconds": run.worker_seconds(),
        "max_workers_seen": max((s[1] + s[2] + s[3] for s in run.samples), default=0),
        "errors": sorted({r.error for r in run.results if r.error})[:3],
    }


def table(rows: list[dict]) -> str:
    lines = ["| pool | TTFT p50 ms | TTFT p99 ms | high-phase TTFT p99 ms | output tok/s "
             "| worker-seconds | most workers | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        lines.append(f"| {s['name']} | {s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} | "
                     f"{s['high_ttft_p99_ms']:.0f} | {s['output_tok_s']:.0f} | "
                     f"{s['worker_seconds']:.0f} | {s['max_workers_seen']} | "
                     f"{s['failed']}/{s['requests']} |")
    return "\n".join(lines)


def plot(runs: list[Run], phases: list[tuple[float, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax_workers, ax_ttft) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t, xs, ys = 0.0, [], []
    for rate, seconds in phases:
        xs += [t, t + seconds]
        ys += [rate, rate]
        t += seconds
    ax_load.plot(xs, ys, color="black")
    ax_load.set_ylabel("offered load\n(requests/s)")
    for run in runs:
        ax_workers.step([s[0] for s in run.samples], [s[1] + s[2] + s[3] for s in run.samples],
                        where="post", label=f"{run.name} (held)")
        ok = [(a, r.ttft) for a, r in zip(run.arrivals, run.results, strict=True) if r.ok]
        ax_ttft.scatter([a for a, _ in ok], [1000 * x for _, x in ok], s=4, label=run.name)
    ax_workers.set_ylabel("workers\n(starting+ready+draining)")
    ax_workers.legend(fontsize=8)
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.set_xlabel("seconds since the load began")
    ax_ttft.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    from raysvc.cli import add_serve_flags

    p = argparse.ArgumentParser(prog="raysvc bench autoscale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="0.5:60,8:40,0.5:100",
                   help="RATE:SECONDS per phase, comma-separated (low, high, low)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poll", type=float, default=0.5, help="seconds between stats polls")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only", default=None, help="comma-separated: elastic,min,max")
    add_serve_flags(p, skip=("seed",))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raysvc.cli import serve_args_from_cli

    if args.max_workers is None:
        args.min_workers, args.max_workers = args.min_workers or 1, 3
    if args.worker_autoscaling is None:
        args.worker_autoscaling = json.dumps({
            "target_ongoing_requests": 4, "upscale_delay_s": 3, "downscale_delay_s": 15,
            "look_back_period_s": 2, "drain_timeout_s": 60})
    elastic = serve_args_from_cli(args)
    lo, hi = elastic.min_workers, elastic.max_workers
    pools = {"elastic": (f"elastic {lo}..{hi}", elastic),
             "min": (f"fixed {lo}", elastic.model_copy(update={
                 "num_workers": lo, "min_workers": lo, "max_workers": lo})),
             "max": (f"fixed {hi}", elastic.model_copy(update={
                 "num_workers": hi, "min_workers": hi, "max_workers": hi}))}
    chosen = args.only.split(",") if args.only else list(pools)
    phases = parse_phases(args.phases)
    times = arrivals(phases, args.seed)
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(10, args.vocab_size) for _ in range(args.input_len)]
               for _ in times]
    high_start = phases[0][1]
    high = (high_start, high_start + phases[1][1]) if len(phases) > 1 else (0.0, 1e9)
    num_cpus = args.num_cpus or hi + 1
    runs = [run_pool(pools[k][0], pools[k][1], prompts, args.output_len, times, args.poll,
                     num_cpus) for k in chosen]
    rows = [summarize(r, high) for r in runs]

    print(f"command: raysvc bench autoscale {' '.join(argv if argv is not None else sys.argv[2:])}")
    print(f"machine: {platform.node()} {platform.machine()}; "
          f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"load: {len(times)} streaming requests, phases {args.phases} (req/s:seconds), "
          f"prompt {args.input_len} tokens, output {args.output_len}; knobs "
          f"{elastic.worker_autoscaling}\n")
    print(table(rows))
    by = {r["name"]: r for r in rows}
    report = {"args": vars(args), "results": rows}
    if "elastic" in chosen and "max" in chosen:
        e, m = by[pools["elastic"][0]], by[pools["max"][0]]
        report["ttft_p99_vs_max"] = e["ttft_p99_ms"] / m["ttft_p99_ms"]
        report["worker_seconds_vs_max"] = e["worker_seconds"] / m["worker_seconds"]
        print(f"\nelastic / fixed-max: TTFT p99 {report['ttft_p99_vs_max']:.2f}x "
              f"(goal <= 1.5), worker-seconds {report['worker_seconds_vs_max']:.2f} "
              f"(goal <= 0.60)")
    for s in rows:
        if s["errors"]:
            print(f"{s['name']} errors: {s['errors']}")
    if args.plot:
        plot(runs, phases, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if all(s["failed"] == 0 for s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
