"""Batch benchmark: the same rows through `raysvc batch` (1 and 2 engine actors), through a
running `raysvc serve` over HTTP, and through HF `generate` with static batches.

    raysvc bench batch                      # 256 rows, prompts 16-256, outputs 16-128

Rows are /v1/completions requests with token-id prompts, greedy, `ignore_eos`, so every
path does the same work. Each path's time is end to end as a user would see it: for
`raysvc batch` that includes starting its local Ray and engine actors (the summary's
`seconds`), for HTTP the requests only (the server was started before the clock),
for HF the generate calls only. Every path's texts must equal raysvc batch's; the model
runs in float32 everywhere (the built-in model's bf16 rounds differently per batch shape,
which flips near-tied greedy choices between paths that batch differently).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from argparse import Namespace
from pathlib import Path


def _rows(w) -> list[dict]:
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0.0,
                      "ignore_eos": True}}
            for i, (p, n) in enumerate(zip(w.prompts, w.output_lens, strict=True))]


def run_batch(rows: list[dict], workdir: Path, actors: int, threads: int) -> tuple[float, dict]:
    from raysvc.batch.job import run

    inp = workdir / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, summary = workdir / f"out{actors}.jsonl", workdir / f"summary{actors}.json"
    args = Namespace(input=str(inp), output=str(out), model=None, served_model_name=None,
                     engine={"max_num_seqs": 256, "dtype": "float32"},
                     concurrency=(actors, actors), batch_size=16,
                     num_gpus_per_worker=None, worker_cpus=1.0, worker_threads=threads,
                     summary_json=str(summary), overwrite=True, address=None)
    assert run(args) == 0
    texts = {}
    for line in out.read_text().splitlines():
        row = json.loads(line)
        texts[row["custom_id"]] = row["response"]["body"]["choices"][0]["text"]
    return json.loads(summary.read_text())["seconds"], texts


def run_http(rows: list[dict], concurrency: int, threads: int) -> tuple[float, dict]:
    import aiohttp

    from raysvc.bench.serve import _free_port
    from raysvc.serve import launcher
    from raysvc.serve.args import ServeArgs

    url = launcher.start(ServeArgs(worker_torch_threads=threads, ingress_replicas=1,
                                   engine={"dtype": "float32"}), port=_free_port())
    try:
        async def main():
            texts = {}
            limit = asyncio.Semaphore(concurrency)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
                async def one(row):
                    async with limit, s.post(url + "/v1/completions", json=row["body"]) as r:
                        texts[row["custom_id"]] = (await r.json())["choices"][0]["text"]

                start = time.perf_counter()
                await asyncio.gather(*(one(r) for r in rows))
                return time.perf_counter() - start, texts

        return asyncio.run(main())
    finally:
        launcher.stop(local=True)


def run_hf(w, batch_size: int) -> tuple[float, dict]:
    from transformers import AutoModelForCausalLM

    from raysvc.bench.engine import run_hf_static
    from raysvc.engine.loading import load_tokenizer
    from raysvc.models.builtin import path

    model = AutoModelForCausalLM.from_pretrained(path("tiny")).float().eval()
    tok = load_tokenizer(path("tiny"))
    seconds, outs = run_hf_static(model, w, batch_size)
    return seconds, {f"r{i}": tok.decode(ids, skip_special_tokens=True)
                     for i, ids in enumerate(outs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raysvc bench batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--prompt-range", default="16,256")
    p.add_argument("--output-range", default="16,128")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--http-concurrency", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    from raysvc.bench.engine import make_workload

    lo, hi = (int(x) for x in args.prompt_range.split(","))
    olo, ohi = (int(x) for x in args.output_range.split(","))
    w = make_workload(args.rows, (lo, hi), (olo, ohi), 4096, args.seed)
    rows = _rows(w)
    tokens = w.output_tokens
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for actors in (1, 2):
            results[f"raysvc batch, {actors} actor(s)"] = run_batch(rows, Path(d), actors,
                                                                    args.threads)
    results["raysvc serve over HTTP, 1 worker"] = run_http(rows, args.http_concurrency,
                                                           args.threads)
    torch.set_num_threads(args.threads)
    results[f"HF generate, static batch {args.hf_batch_size}"] = run_hf(w, args.hf_batch_size)

    reference = results["raysvc batch, 1 actor(s)"][1]
    print(f"command: raysvc bench batch {' '.join(argv or [])}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; "
          f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"workload: {args.rows} rows, prompts {args.prompt_range} tokens, outputs "
          f"{args.output_range} ({tokens} tokens), greedy; {args.threads} torch thread(s) "
          f"per engine\n")
    print("| path | seconds | output tok/s | vs HF | greedy texts equal |")
    print("|---|---:|---:|---:|---|")
    hf = tokens / results[f"HF generate, static batch {args.hf_batch_size}"][0]
    for name, (seconds, texts) in results.items():
        same = sum(texts.get(k) == v for k, v in reference.items())
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:.0f} | {tokens / seconds / hf:.2f}x "
              f"| {same}/{len(reference)} |")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
