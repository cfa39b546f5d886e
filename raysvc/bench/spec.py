"""Speculative decoding benchmark on the built-in pair: tokens/s with and without.

    python -m raysvc.bench.spec

One run, one process: for batch sizes 1, 16 and 64, plain decoding, then each proposer
(draft model in process, n-gram lookup), adaptive (the default: k and on/off chosen from
measured costs) and with a fixed k. Prints output tokens/s, the ratio to plain decoding,
the acceptance rate and the mean accepted length, and whether greedy outputs agree.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

PROMPTS = ["The list type", "A dictionary", "The while statement", "Exceptions are",
           "The import system", "def f(x):", "Strings are", "The for statement"]


def run(batch: int, max_tokens: int, spec: dict | None, dtype: str):
    from raysvc import LLM, SamplingParams

    llm = LLM(dtype=dtype, speculative_config=spec, max_num_seqs=max(batch, 1))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    # warm-up at the measured batch: compiles (GPU) and the controller's first estimates
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return batch * max_tokens / elapsed, [o.outputs[0].token_ids for o in outs], llm.stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="raysvc bench spec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [
        ("draft model, adaptive", {"method": "draft_model", "num_speculative_tokens": args.k}),
        (f"draft model, k={args.k} fixed",
         {"method": "draft_model", "num_speculative_tokens": args.k, "adaptive": False}),
        ("n-gram, adaptive", {"method": "ngram", "num_speculative_tokens": args.k}),
        (f"n-gram, k={args.k} fixed",
         {"method": "ngram", "num_speculative_tokens": args.k, "adaptive": False}),
    ]
    print(f"built-in tiny (target) + tiny-draft, {args.dtype}, greedy, {args.max_tokens} "
          f"output tokens per request, {args.threads} threads")
    print("\n| batch | decoding | output tok/s | vs plain | acceptance | mean accepted length "
          "| final k | greedy = plain |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for batch in args.batches:
        base_tps, base_out, _ = run(batch, args.max_tokens, None, args.dtype)
        print(f"| {batch} | plain | {base_tps:.0f} | 1.00x | - | - | - | - |", flush=True)
        for name, spec in variants:
            tps, out, st = run(batch, args.max_tokens, spec, args.dtype)
            print(f"| {batch} | {name} | {tps:.0f} | {tps / base_tps:.2f}x "
                  f"| {st['spec_acceptance_rate']:.2f} | {st['spec_mean_accepted_length']:.2f} "
                  f"| {st['spec_num_speculative_tokens']} | {out == base_out} |", flush=True)


if __name__ == "__main__":
    main()
