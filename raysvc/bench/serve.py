"""Serving benchmark: load an OpenAI-compatible endpoint, report what `vllm bench serve` does.

    raysvc bench serve                       # starts a local raysvc server, then loads it
    raysvc bench serve --url http://host:8000 --model NAME
    raysvc bench serve --compare-engine      # + the bare AsyncEngine on the same workload
    raysvc bench serve --mode requests       # requests/s vs a bare Serve echo app

Requests are streaming /v1/completions with token-id prompts of fixed lengths and
`ignore_eos`, so every request produces exactly `--output-len` tokens and any server (raysvc,
vLLM) gets the same work. Load is a fixed concurrency, or a Poisson request rate. Reports
request throughput, output tokens/s, and TTFT, TPOT, ITL (mean, p50, p90, p99) as a
markdown table and JSON. With `--compare-engine`, the same workload (same prompts, same
concurrency or arrival times) runs on an in-process `AsyncEngine` with the worker's engine
settings, and the HTTP path's output throughput is reported as a ratio of the engine's.

`--mode requests` measures the request rate instead of tokens: max_tokens 1, short
prompts, many concurrent clients (64 unless `--concurrency` says otherwise), 2,000
requests. On the same local Ray and Serve it then runs the same workload against a bare
Serve app that echoes (`echo.py`, the ingress's replica count and options): the ceiling
of Serve's proxy on this machine; raysvc's requests/s is reported as a share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    ok: bool = False
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Workload:
    prompts: list[list[int]]
    output_len: int
    arrivals: list[float] | None  # seconds from start, for --request-rate; None: concurrency
    concurrency: int


def make_workload(args) -> Workload:
    rng = random.Random(args.seed)
    lo = max(1, int(args.input_len * (1 - args.range_ratio)))
    prompts = [[rng.randrange(10, args.vocab_size) for _ in range(rng.randint(lo, args.input_len))]
               for _ in range(args.num_prompts)]
    arrivals = None
    if args.request_rate:
        t, arrivals = 0.0, []
        for _ in prompts:
            arrivals.append(t)
            t += rng.expovariate(args.request_rate)
    return Workload(prompts, args.output_len, arrivals, args.concurrency)


async def drive(w: Workload, one) -> tuple[list[Result], float]:
    """Run `one(i)` for every prompt under the workload's concurrency or arrival times."""
    limit = asyncio.Semaphore(w.concurrency if w.arrivals is None else 1 << 30)
    start = time.perf_counter()

    async def run(i: int) -> Result:
        if w.arrivals is not None:
            await asyncio.sleep(max(0.0, start + w.arrivals[i] - time.perf_counter()))
        async with limit:
            return await one(i)

    results = await asyncio.gather(*(run(i) for i in range(len(w.prompts))))
    return list(results), time.perf_counter() - start


async def stream_completion(session, url: str, model: str, prompt: list[int],
                            output_len: int) -> Result:
    """One streaming /v1/completions request, timed as its client sees it."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    r = Result(start=time.perf_counter())
    last = r.start
    try:
        async with session.post(url.rstrip("/") + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in data:
                    r.error = f"stream error: {data['error'].get('message', '')[:200]}"
                    return r
                if data.get("usage"):
                    r.output_tokens = data["usage"]["completion_tokens"]
                if any(c.get("text") for c in data.get("choices", [])):
                    if not r.ttft:
                        r.ttft = now - r.start
                    else:
                        r.itl.append(now - last)
                    last = now
        r.latency = time.perf_counter() - r.start
        r.ok = r.output_tokens > 0
    except Exception as e:  # count it, keep going
        r.error = f"{type(e).__name__}: {e}"
    return r


def http_session(api_key: str | None = None):
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                 headers=headers)


async def http_run(args, w: Workload, url: str | None = None) -> tuple[list[Result], float]:
    async with http_session(args.api_key) as session:
        async def one(i: int) -> Result:
            return await stream_completion(session, url or args.url, args.model,
                                           w.prompts[i], w.output_len)

        # warm-up: first-request costs are not throughput (a full wave of clients, so
        # every replica and connection is warm before the clock starts)
        await asyncio.gather(*(one(i % len(w.prompts)) for i in range(w.concurrency)))
        return await drive(w, one)


async def engine_run(args, w: Workload, engine_kwargs: dict) -> tuple[list[Result], float]:
    from raysvc import AsyncEngine, SamplingParams

    engine = AsyncEngine(args.model_dir, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    ids = iter(range(1 << 30))

    async def one(i: int) -> Result:
        r = Result(start=time.perf_counter())
        last, seen = r.start, 0
        async for out in await engine.add_request(f"b{next(ids)}", w.prompts[i], params):
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            if n > seen:
                if not r.ttft:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last)
                last, seen = now, n
        r.latency, r.output_tokens, r.ok = time.perf_counter() - r.start, seen, True
        return r

    try:
        await one(0)
        return await drive(w, one)
    finally:
        await engine.shutdown()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(name: str, results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    s = {"name": name, "completed": len(ok), "failed": len(results) - len(ok),
         "duration_s": seconds, "request_throughput": len(ok) / seconds,
         "output_throughput": out_tokens / seconds, "total_output_tokens": out_tokens,
         "errors": sorted({r.error for r in results if r.error})[:3]}
    for key, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl)):
        s[f"mean_{key}_ms"] = 1000 * sum(values) / len(values) if values else float("nan")
        for q in (50, 90, 99):
            s[f"p{q}_{key}_ms"] = 1000 * _pct(values, q)
    return s


def table(rows: list[dict]) -> str:
    head = ("| path | req/s | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms "
            "| ITL p50/p90/p99 ms | ok/failed |\n|---|---:|---:|---|---|---|---|")
    lines = [head]
    for s in rows:
        trio = lambda k, s=s: "/".join(f"{s[f'p{q}_{k}_ms']:.1f}" for q in (50, 90, 99))
        lines.append(f"| {s['name']} | {s['request_throughput']:.2f} | "
                     f"{s['output_throughput']:.0f} | {trio('ttft')} | {trio('tpot')} | "
                     f"{trio('itl')} | {s['completed']}/{s['failed']} |")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    from raysvc.cli import add_serve_flags

    p = argparse.ArgumentParser(prog="raysvc bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="server to load (default: start a local one)")
    p.add_argument("--mode", choices=("tokens", "requests"), default="tokens",
                   help="tokens: streaming throughput and latencies; requests: requests/s "
                        "with max_tokens 1, next to a bare Serve echo app (the ceiling)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="default 200 (tokens), 2000 (requests)")
    p.add_argument("--input-len", type=int, default=None, help="default 128 (tokens), 16")
    p.add_argument("--output-len", type=int, default=128, help="(1 in requests mode)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt lengths uniform in [input_len*(1-r), input_len]")
    p.add_argument("--concurrency", type=int, default=None,
                   help="default 16 (tokens), 64 (requests)")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson rate (req/s)")
    p.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids < this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-engine", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    add_serve_flags(p, skip=("seed",))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raysvc.cli import serve_args_from_cli

    requests_mode = args.mode == "requests"
    for name, tokens, requests in (("num_prompts", 200, 2000), ("input_len", 128, 16),
                                   ("concurrency", 16, 64)):
        if getattr(args, name) is None:
            setattr(args, name, requests if requests_mode else tokens)
    if requests_mode:
        args.output_len = 1

    serve_args = serve_args_from_cli(args)
    args.model_dir = args.model
    args.model = serve_args.model_name() if args.url is None else (args.served_model_name
                                                                  or args.model or "tiny")
    w = make_workload(args)
    threads = serve_args.worker_spec().threads()
    rows = []
    if args.compare_engine:  # before any server starts, so it runs on a quiet machine
        import torch

        torch.set_num_threads(threads)
        rows.append(summarize("AsyncEngine (in-process)",
                              *asyncio.run(engine_run(args, w, serve_args.engine))))
    local = args.url is None
    if local:
        from raysvc.serve import launcher

        args.url = launcher.start(serve_args, port=_free_port(), num_cpus=args.num_cpus)
    try:
        rows.insert(0, summarize(f"HTTP {args.url}", *asyncio.run(http_run(args, w))))
        if requests_mode and local:  # the ceiling, on the same Ray, Serve and proxy
            from raysvc.bench import echo

            prefix = echo.deploy(serve_args.ingress_replicas, serve_args.ingress_num_cpus,
                                 serve_args.max_ongoing_requests)
            rows.append(summarize("bare Serve echo app (the ceiling)",
                                  *asyncio.run(http_run(args, w, args.url + prefix))))
    finally:
        if local:
            launcher.stop(local=True)

    load = (f"rate {args.request_rate}/s" if args.request_rate
            else f"concurrency {args.concurrency}")
    print(f"command: raysvc bench serve {' '.join(argv if argv is not None else sys.argv[2:])}")
    print(f"machine: {platform.node()} {platform.machine()}, {_cpus()} CPUs, "
          f"{platform.python_version()}; date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"workload: {args.num_prompts} requests, prompt {args.input_len} tokens "
          f"(range ratio {args.range_ratio}), output {args.output_len} tokens, {load}; "
          f"worker torch threads {threads}\n")
    print(table(rows))
    report = {"args": {k: v for k, v in vars(args).items() if k != "api_key"}, "results": rows}
    if args.compare_engine:
        ratio = rows[0]["output_throughput"] / rows[1]["output_throughput"]
        report["http_over_engine"] = ratio
        print(f"\nHTTP / engine output throughput: {ratio:.2f}")
    if rows[-1]["name"].startswith("bare Serve echo"):
        ratio = rows[0]["request_throughput"] / rows[-1]["request_throughput"]
        report["raysvc_over_echo"] = ratio
        print(f"\nraysvc / bare Serve echo requests/s: {ratio:.2f}")
    for s in rows:
        if s["errors"]:
            print(f"{s['name']} errors: {s['errors']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if all(s["failed"] == 0 for s in rows) else 1


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
