"""Speculative decoding benchmark on the built-in pair: tokens/s with and without.

    python -m raysvc.bench.spec            (or: raysvc bench spec)

One run, one process: for batch sizes 1, 16 and 64, plain decoding, then each proposer
(draft model in process, draft model in a Ray actor pool, n-gram lookup), adaptive (the
default: k and on/off chosen from measured costs) and with a fixed k. Prints output
tokens/s, the ratio to plain decoding, the acceptance rate, the mean accepted length and
the acceptance per position, and whether greedy outputs agree. First, the forward-pass
costs that bound what speculation can gain (eager, one sequence, 100-token context).

The actor pool runs one draft actor on a local Ray (started here, `--pool-threads` torch
threads): the same draft engine as in process, plus one Ray call per step.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

PROMPTS = ["The list type", "A dictionary", "The while statement", "Exceptions are",
           "The import system", "def f(x):", "Strings are", "The for statement"]


def run(batch: int, max_tokens: int, spec: dict | None, dtype: str, repeats: int,
        proposer=None, **engine_kwargs):
    """Best output tokens/s of `repeats` timed runs (the machine is shared: the best run is
    the one least disturbed), the greedy outputs, and the engine's stats."""
    from raysvc import LLM, SamplingParams

    llm = LLM(dtype=dtype, speculative_config=spec, max_num_seqs=max(batch, 1),
              proposer=proposer, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    # warm-up at the measured batch: compiles (GPU) and the controller's first estimates
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    best, outputs = 0.0, None
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        best = max(best, batch * max_tokens / (time.perf_counter() - start))
        tokens = [o.outputs[0].token_ids for o in outs]
        if outputs is not None and tokens != outputs:
            raise AssertionError("greedy outputs differ between repeats")
        outputs = tokens
    return best, outputs, llm.stats()


def forward_ms(model: str, dtype: str, q_len: int, context: int = 100, n: int = 100) -> float:
    """Milliseconds of one forward pass of `q_len` new tokens on a `context`-token sequence
    (the model runner alone: no scheduling, no sampling)."""
    from raysvc.engine.config import EngineConfig
    from raysvc.engine.llm_engine import LLMEngine
    from raysvc.engine.sampling_params import SamplingParams
    from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
    from raysvc.engine.sequence import Request
    from raysvc.models.builtin import path

    engine = LLMEngine(EngineConfig(model=str(path(model)), dtype=dtype, num_kv_blocks=64,
                                    enforce_eager=True))
    seq = Request("r", None, [5 + i % 50 for i in range(context)], SamplingParams(),
                  ()).seqs[0]
    engine.block_manager.allocate_slots(seq, context)
    seq.num_computed_tokens = context - q_len
    step = engine.runner.prepare(SchedulerOutput([ScheduledSeq(seq, q_len)]),
                                 list(range(q_len)))
    for _ in range(10):
        engine.runner.execute(step)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        engine.runner.execute(step)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def print_forward_costs(k: int) -> None:
    """What bounds speculation here: verification (k + 1 tokens) and a draft round, in
    target decode steps."""
    print("\n| dtype | target, 1 token | target, k + 1 tokens | draft round | verify / step "
          "| draft round / step |\n|---|---:|---:|---:|---:|---:|")
    for dtype in ("float32", "bfloat16"):
        one, verify = forward_ms("tiny", dtype, 1), forward_ms("tiny", dtype, k + 1)
        draft = forward_ms("tiny-draft", dtype, 1)
        print(f"| {dtype} | {one:.2f} ms | {verify:.2f} ms | {draft:.2f} ms "
              f"| {verify / one:.2f} | {draft / one:.2f} |", flush=True)


def start_pool(dtype: str, threads: int) -> list:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from raysvc.cluster.draft_pool import start_draft_pool

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
             logging_level="warning", log_to_driver=False)
    return start_draft_pool(1, dtype=dtype, num_cpus=1, num_threads=threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="raysvc bench spec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dtype", default="auto", help="auto: the models' own (bfloat16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--pool-threads", type=int, default=1)
    parser.add_argument("--no-pool", action="store_true", help="skip the actor-pool rows")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (best kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    draft = {"method": "draft_model", "num_speculative_tokens": args.k}
    ngram = {"method": "ngram", "num_speculative_tokens": args.k}
    fixed = {"adaptive": False}
    variants = [  # name, speculative_config, actor pool?, engine kwargs
        ("draft model, adaptive", draft, False, {}),
        (f"draft model, k={args.k} fixed", {**draft, **fixed}, False, {}),
        ("draft actor pool, adaptive", draft, True, {}),
        (f"draft actor pool, k={args.k} fixed", {**draft, **fixed}, True, {}),
        ("n-gram, adaptive", ngram, False, {}),
        (f"n-gram, k={args.k} fixed", {**ngram, **fixed}, False, {}),
    ]
    if torch.cuda.is_available():  # what the draft's CUDA graphs save
        variants.insert(2, (f"draft model, k={args.k} fixed, no CUDA graphs (target or draft)",
                            {**draft, **fixed}, False, {"enforce_eager": True}))
    if args.no_pool:
        variants = [v for v in variants if not v[2]]
    actors = start_pool(args.dtype, args.pool_threads) if not args.no_pool else []
    print(f"built-in tiny (target) + tiny-draft, dtype {args.dtype}, greedy, {args.max_tokens} "
          f"output tokens per request, {args.threads} threads, best of {args.repeats} runs")
    print_forward_costs(args.k)
    print("\n| batch | decoding | output tok/s | vs plain | acceptance | mean accepted length "
          "| acceptance per position | final k | greedy = plain |")
    print("|---:|---|---:|---:|---:|---:|---|---:|---|")
    for batch in args.batches:
        base_tps, base_out, _ = run(batch, args.max_tokens, None, args.dtype, args.repeats)
        print(f"| {batch} | plain | {base_tps:.0f} | 1.00x | - | - | - | - | - |", flush=True)
        if torch.cuda.is_available():  # what CUDA graphs save plain decoding
            tps, out, _ = run(batch, args.max_tokens, None, args.dtype, args.repeats,
                              enforce_eager=True)
            print(f"| {batch} | plain, no CUDA graphs | {tps:.0f} | {tps / base_tps:.2f}x "
                  f"| - | - | - | - | {out == base_out} |", flush=True)
        for name, spec, pool, engine_kwargs in variants:
            proposer = None
            if pool:
                from raysvc.cluster.draft_pool import DraftPoolProposer

                proposer = DraftPoolProposer(actors, timeout_s=60)
            tps, out, st = run(batch, args.max_tokens, spec, args.dtype, args.repeats, proposer,
                               **engine_kwargs)
            per_pos = " ".join("-" if a is None else f"{a:.2f}"
                               for a in st["spec_acceptance_per_position"])
            print(f"| {batch} | {name} | {tps:.0f} | {tps / base_tps:.2f}x "
                  f"| {st['spec_acceptance_rate']:.2f} | {st['spec_mean_accepted_length']:.2f} "
                  f"| {per_pos} | {st['spec_num_speculative_tokens']} | {out == base_out} |",
                  flush=True)


if __name__ == "__main__":
    main()
