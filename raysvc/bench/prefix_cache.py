"""Prefix-cache benchmark: a shared-system-prompt workload with caching on vs off.

    python -m raysvc.bench.prefix_cache

G system prompts (~1k tokens) x U users, each user adding a short question; requests
arrive by a seeded Poisson process (the same schedule for both runs) and are fed to one
engine step loop in this process. Prints throughput, time to first token (mean, p50,
p99) and tokens computed for each setting, side by side, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from raysvc.bench.engine import random_checkpoint


def workload(groups: int, users: int, system_len: int, vocab: int, seed: int):
    rng = random.Random(seed)
    systems = [[rng.randrange(3, vocab) for _ in range(system_len)] for _ in range(groups)]
    prompts = [systems[g] + [rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))]
               for _ in range(users) for g in range(groups)]
    rng.shuffle(prompts)
    return prompts


def run(path: str, prompts, arrivals, max_tokens: int, caching: bool) -> dict:
    from raysvc import LLM, SamplingParams

    llm = LLM(path, enable_prefix_caching=caching, max_num_batched_tokens=2048)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ttft: dict[str, float] = {}
    arrived: dict[str, float] = {}
    done = 0
    i = 0
    start = time.perf_counter()
    while done < len(prompts):
        now = time.perf_counter() - start
        while i < len(prompts) and arrivals[i] <= now:
            engine.add_request(f"r{i}", prompts[i], params)
            arrived[f"r{i}"] = arrivals[i]
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(arrivals[i] - now, 0))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.request_id not in ttft and out.outputs[0].token_ids:
                ttft[out.request_id] = t - arrived[out.request_id]
            done += out.finished
    elapsed = time.perf_counter() - start
    ttfts = sorted(ttft.values())
    stats = llm.stats()
    return {"elapsed": elapsed, "tok_s": len(prompts) * max_tokens / elapsed,
            "ttft_mean": statistics.mean(ttfts), "ttft_p50": ttfts[len(ttfts) // 2],
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
            "computed": stats["num_computed_tokens"], "hits": stats["prefix_cache_hits"],
            "queries": stats["prefix_cache_queries"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="raysvc bench prefix-cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: a random Llama, 6 layers)")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tmp
        if not args.model:
            random_checkpoint(tmp, args.seed, max_len=2048)
        from raysvc.models.config import ModelConfig

        vocab = ModelConfig.from_dir(path).vocab_size
        prompts = workload(args.groups, args.users, args.system_len, vocab, args.seed)
        rng = random.Random(args.seed)
        t, arrivals = 0.0, []
        for _ in prompts:
            t += rng.expovariate(args.rate)
            arrivals.append(t)
        print(f"{len(prompts)} requests = {args.groups} system prompts of {args.system_len} "
              f"tokens x {args.users} users (+16-64 token questions), {args.max_tokens} output "
              f"tokens each, Poisson arrivals at {args.rate}/s; {args.threads} threads")
        off = run(path, prompts, arrivals, args.max_tokens, caching=False)
        on = run(path, prompts, arrivals, args.max_tokens, caching=True)
    print("\n| prefix caching | seconds | output tok/s | TTFT mean | TTFT p50 | TTFT p99 "
          "| tokens computed | cache hits / queries |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in (("off", off), ("on", on)):
        print(f"| {name} | {r['elapsed']:.1f} | {r['tok_s']:.0f} | {r['ttft_mean']:.3f} s "
              f"| {r['ttft_p50']:.3f} s | {r['ttft_p99']:.3f} s | {r['computed']} "
              f"| {r['hits']} / {r['queries']} |")
    print(f"\non/off: throughput {on['tok_s'] / off['tok_s']:.2f}x, mean TTFT "
          f"{off['ttft_mean'] / on['ttft_mean']:.2f}x lower, p99 TTFT "
          f"{off['ttft_p99'] / on['ttft_p99']:.2f}x lower")


if __name__ == "__main__":
    main()
