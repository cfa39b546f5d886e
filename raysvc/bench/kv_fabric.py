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

Part 3 (migrate): live migration on drain. For each way of draining, a router with one
worker A runs `--streams` greedy streams (`--stream-prompt-len` prompt tokens each,
`--stream-max-tokens` outputs); once every stream has `--drain-after` tokens, worker B
joins and A is drained: with live migration (the streams move with their KV), or handed
over at once with the continuation's prefix pulled from A (the kv fabric without
migration), or handed over and re-prefilled. Prints the tokens recomputed (every token
both engines computed, minus the undisturbed run's streams x (prompt + outputs - 1)),
the longest gap between two chunks of any stream after the drain began (vs the median
gap before it), and whether every stream's tokens equal across the runs.
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
    p.add_argument("--streams", type=int, default=16, help="part 3's streams")
    p.add_argument("--stream-prompt-len", type=int, default=1000, help="part 3's prompts")
    p.add_argument("--stream-max-tokens", type=int, default=128, help="part 3's outputs")
    p.add_argument("--drain-after", type=int, default=16,
                   help="part 3: tokens every stream has before the drain")
    p.add_argument("--part", choices=["pull", "tier", "migrate", "all"], default="all")
    args = p.parse_args(argv)
    model = random_llama(Path(tempfile.mkdtemp(prefix="raysvc-bench-kv-")) / "model",
                         args.hidden_size)
    if args.part in ("pull", "all"):
        pull(args, model)
    if args.part in ("tier", "all"):
        host_tier(model, args.dtype, args.pool_blocks, args.requests)
    if args.part in ("migrate", "all"):
        migration(args, model)
    return 0


def _local_ray():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error")
    return ray


def pull(args, model: str) -> None:
    from raysvc.cluster import WorkerSpec, add_workers, start_router

    ray = _local_ray()
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


MIGRATION_RUNS = (  # name, live migration, the router's pull_weight
    ("live migration", True, 0.7),
    ("hand-over + prefix pull", False, 0.7),
    ("hand-over, re-prefill", False, 0.0),
)


def migration(args, model: str) -> None:
    from raysvc.cluster import ClusterClient, WorkerSpec, add_workers, start_router
    from raysvc.cluster.launch import start_worker

    ray = _local_ray()
    max_tokens, streams, plen = args.stream_max_tokens, args.streams, args.stream_prompt_len
    blocks = 2 * streams * -(-(plen + max_tokens) // 16) + 64
    spec = WorkerSpec(engine_kwargs={"model": model, "dtype": args.dtype, "block_size": 16,
                                     "num_kv_blocks": blocks, "max_num_batched_tokens": 4096,
                                     "max_model_len": 4096},
                      num_cpus=0, torch_threads=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 8000, (plen,), generator=g).tolist() for _ in range(streams)]
    params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    rows, outputs = [], []
    for run, (name, migrate, pull_weight) in enumerate(MIGRATION_RUNS):
        router = start_router(health_interval_s=0.3, events_wait_s=0.2,
                              placement={"pull_weight": pull_weight})
        a = add_workers(router, spec, 1, prefix=f"A{run}", timeout_s=600)
        b = start_worker(f"B{run}", spec, router)  # loaded now, joins the router later
        ray.get(b.info.remote(), timeout=600)

        async def measure(router=router, migrate=migrate, run=run, b=b):
            client = ClusterClient(router)
            arrivals: list[list[float]] = [[] for _ in prompts]
            tokens: list[list[int]] = [[] for _ in prompts]
            ready = asyncio.Event()

            async def one(i: int) -> None:
                async for chunk in client.generate(f"m{run}-{i}", prompts[i], params):
                    got = [t for d in chunk.deltas for t in d.token_ids]
                    if got:
                        tokens[i] += got
                        arrivals[i].append(time.perf_counter())
                    if all(len(t) >= args.drain_after for t in tokens):
                        ready.set()

            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            await ready.wait()
            await router.add_worker.remote(f"B{run}", b)
            await asyncio.sleep(0.5)  # the router has B's load report (its pull cost model)
            drained_at = time.perf_counter()
            # without migration: handed over at once (a drain at its deadline)
            await router.drain_worker.remote(f"A{run}-0", 600 if migrate else 0, migrate)
            await asyncio.gather(*tasks)
            return tokens, arrivals, drained_at

        tokens, arrivals, drained_at = asyncio.run(measure())
        computed = ray.get(a[f"A{run}-0"].load.remote(), timeout=60).num_computed_tokens
        stats = ray.get(router.stats.remote(), timeout=60)
        computed += sum(w["num_computed_tokens"] for w in stats["workers"])
        undisturbed = streams * (plen + max_tokens - 1)
        gaps_before = [b - a for ts in arrivals for a, b in zip(ts, ts[1:], strict=False)
                       if b < drained_at]
        stall = max(b - max(a, drained_at) for ts in arrivals
                    for a, b in zip(ts, ts[1:], strict=False) if b >= drained_at)
        carried = sum(w["kv_tokens_carried"] for w in stats["workers"])
        rows.append((name, computed - undisturbed, stall, statistics.median(gaps_before),
                     stats["requests_migrated"], carried))
        outputs.append(tokens)
        for handle in (router, b, *a.values()):
            ray.kill(handle)
    ray.shutdown()
    print(f"machine: {os.cpu_count()} cores; model: random Llama hidden {args.hidden_size}, "
          f"6 layers, {args.dtype}; {streams} streams of {plen} prompt + {max_tokens} output "
          f"tokens; worker A drained once every stream has {args.drain_after} tokens")
    print("| drain | tokens recomputed | longest stall of a stream | median gap before | "
          "migrated | tokens carried |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, recomputed, stall, gap, migrated, carried in rows:
        print(f"| {name} | {recomputed} | {stall * 1000:.0f} ms | {gap * 1000:.0f} ms | "
              f"{migrated} | {carried} |")
    same = all(o == outputs[0] for o in outputs)
    print(f"every stream's tokens equal across the runs: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    raise SystemExit(main())
