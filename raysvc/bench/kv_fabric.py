"""KV fabric benchmark: the first token of a request whose long prefix lives on another
worker, pulled vs recomputed.

    python -m raysvc.bench.kv_fabric        (or: raysvc bench kv-fabric)

Part 1 (pull): one local Ray, two routers with two workers each, the same model (a random
Llama with a 4,096-token context, built here: no download). The routers differ in one
knob: `pull_weight` 0.7 (the fabric on) or 0 (off: the prefix is recomputed). Both
balance at any load difference, so a prompt's second request goes to the worker that did
not serve its first. For each of `--repeats` fresh prompts (`--prefix-len` tokens): the
request runs once (the first worker computes it), then again, timed: time to first token
at the client, through the router, as a user sees it. Prints the medians and the ratio.

Part 2 (host tier): one engine, no Ray, a device pool of `--pool-blocks` and a working set
of prefixes four times as large, asked for in random order (each request a prefix plus a
fresh suffix), with and without `kv_offload_bytes`: prefix-cache hit rate, hits served by
the host tier, and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def random_llama(path: Path, hidden: int = 256, layers: int = 6) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32,
                         num_key_value_heads=max(hidden // 64, 1), vocab_size=8192,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


async def ttft(client, request_id: str, prompt: list[int]) -> float:
    """Seconds from asking to the first generated token (the rest is drained)."""
    start, first = time.perf_counter(), None
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
    async for chunk in client.generate(request_id, prompt, params):
        if first is None and any(d.token_ids for d in chunk.deltas):
            first = time.perf_counter() - start
    return first


def host_tier(model: str, dtype: str, pool_blocks: int, requests: int) -> None:
    from raysvc import LLM, SamplingParams

    block, prefix_blocks = 16, 32
    num_prefixes = 4 * pool_blocks // prefix_blocks  # a working set 4x the pool
    g = torch.Generator().manual_seed(2)
    prefixes = [torch.randint(3, 8000, (block * prefix_blocks,), generator=g).tolist()
                for _ in range(num_prefixes)]
    order = torch.randint(0, num_prefixes, (requests,), generator=g).tolist()
    prompts = [prefixes[i] + torch.randint(3, 8000, (16,), generator=g).tolist()
               for i in order]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    print(f"host tier: device pool {pool_blocks} blocks, working set {num_prefixes} prefixes x "
          f"{prefix_blocks} blocks ({num_prefixes * prefix_blocks} blocks), {requests} "
          f"requests in random order, 4 at a time")
    print("| run | prefix hit rate | of which from host | requests/s | vs no tier |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, offload in (("no host tier", 0), ("host tier", 4 << 30)):
        llm = LLM(model, dtype=dtype, block_size=block, num_kv_blocks=pool_blocks,
                  max_num_batched_tokens=4096, max_model_len=1024, kv_offload_bytes=offload)
        start = time.perf_counter()
        for i in range(0, requests, 4):
            llm.generate(prompts[i:i + 4], params)
        rate = requests / (time.perf_counter() - start)
        s = llm.stats()
        base = base or rate
        print(f"| {name} | {s['prefix_cache_hits'] / s['prefix_cache_queries']:.2f} | "
              f"{s['prefix_cache_hits_host'] / max(s['prefix_cache_hits'], 1):.2f} | "
              f"{rate:.2f} | {rate / base:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raysvc bench kv-fabric", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--pool-blocks", type=int, default=128, help="part 2's device pool")
    p.add_argument("--requests", type=int, default=64, help="part 2's requests")
    p.add_argument("--part", choices=["pull", "tier", "both"], default="both")
    args = p.parse_args(argv)
    model = random_llama(Path(tempfile.mkdtemp(prefix="raysvc-bench-kv-")) / "model",
                         args.hidden_size)
    if args.part in ("pull", "both"):
        pull(args, model)
    if args.part in ("tier", "both"):
        host_tier(model, args.dtype, args.pool_blocks, args.requests)
    return 0


def pull(args, model: str) -> None:

    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from raysvc.cluster import WorkerSpec, add_workers, start_router

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error")
    spec = WorkerSpec(engine_kwargs={"model": model, "dtype": args.dtype, "block_size": 16,
                                     "num_kv_blocks": 1024, "max_num_batched_tokens": 4096},
                      num_cpus=0, torch_threads=1)
    runs = {}
    for name, pull_weight in (("pull", 0.7), ("recompute", 0.0)):
        router = start_router(health_interval_s=0.3, events_wait_s=0.2, placement={
            "balance_abs": 0.0, "balance_rel": 0.0, "pull_weight": pull_weight})
        workers = add_workers(router, spec, 2, prefix=f"{name}-worker", timeout_s=600)
        runs[name] = (router, workers)
    g = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"pull": [], "recompute": [], "first (cold)": []}

    async def measure() -> None:
        from raysvc.cluster import ClusterClient

        clients = {name: ClusterClient(router) for name, (router, _) in runs.items()}
        for i in range(args.repeats):
            prompt = torch.randint(3, 8000, (args.prefix_len + 1,), generator=g).tolist()
            for name, client in clients.items():
                cold = await ttft(client, f"{name}-{i}-a", prompt)
                if name == "recompute":
                    times["first (cold)"].append(cold)
                await asyncio.sleep(1.0)  # the router hears of the blocks (KV events)
                times[name].append(await ttft(client, f"{name}-{i}-b", prompt))

    asyncio.run(measure())
    stats = {name: ray.get(r.stats.remote(), timeout=60)["workers"]
             for name, (r, _) in runs.items()}
    pulled = sum(w["kv_pull_blocks"] for w in stats["pull"])
    pull_bytes = sum(w["kv_pull_bytes"] for w in stats["pull"])
    pull_s = sum(w["kv_pull_s"] for w in stats["pull"])
    pulls = sum(w["kv_pulls"] for w in stats["pull"])
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {os.cpu_count()} cores; model: random Llama hidden {args.hidden_size}, "
          f"6 layers, {args.dtype}; prefix {args.prefix_len} tokens; {args.repeats} prompts")
    print("| second request of a prompt, on the other worker | median TTFT | vs recompute |")
    print("|---|---:|---:|")
    for name in ("pull", "recompute"):
        print(f"| {name} | {med[name] * 1000:.1f} ms | {med[name] / med['recompute']:.2f}x |")
    print(f"(the first request, cold: {med['first (cold)'] * 1000:.1f} ms)")
    print(f"pulls: {pulls}, blocks {pulled}, {pull_bytes / 2**20:.1f} MiB, "
          f"{pull_s * 1000 / max(pulls, 1):.1f} ms per pull at the puller; recomputes "
          f"avoided: {pulled * 16} tokens")


if __name__ == "__main__":
    raise SystemExit(main())
