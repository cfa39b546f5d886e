"""KV fabric benchmark: the first token of a request whose long prefix lives on another
worker, pulled vs recomputed.

    python -m raysvc.bench.kv_fabric        (or: raysvc bench kv-fabric)

One run, one local Ray: two routers with two workers each, the same model (a random
Llama with a 4,096-token context, built here: no download). The routers differ in one
knob: `pull_weight` 0.7 (the fabric on) or 0 (off: the prefix is recomputed). Both
balance at any load difference, so a prompt's second request goes to the worker that did
not serve its first. For each of `--repeats` fresh prompts (`--prefix-len` tokens): the
request runs once (the first worker computes it), then again, timed: time to first token
at the client, through the router, as a user sees it. Prints the medians and the ratio.
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


async def ttft(router, request_id: str, prompt: list[int]) -> float:
    """Seconds from asking to the first generated token (the rest is drained)."""
    from raysvc.cluster import ClusterClient

    start, first = time.perf_counter(), None
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
    async for chunk in ClusterClient(router).generate(request_id, prompt, params):
        if first is None and any(d.token_ids for d in chunk.deltas):
            first = time.perf_counter() - start
    return first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raysvc bench kv-fabric", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from raysvc.cluster import WorkerSpec, add_workers, start_router

    model = random_llama(Path(tempfile.mkdtemp(prefix="raysvc-bench-kv-")) / "model",
                         args.hidden_size)
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

    async def one(name: str, i: int, prompt: list[int]) -> None:
        router, _ = runs[name]
        cold = await ttft(router, f"{name}-{i}-a", prompt)
        if name == "recompute":
            times["first (cold)"].append(cold)
        await asyncio.sleep(1.0)  # the router hears of the blocks (KV events), and reports
        times[name].append(await ttft(router, f"{name}-{i}-b", prompt))

    for i in range(args.repeats):
        prompt = torch.randint(3, 8000, (args.prefix_len + 1,), generator=g).tolist()
        for name in runs:
            asyncio.run(one(name, i, prompt))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
