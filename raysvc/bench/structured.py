"""Decoding throughput with a JSON schema vs without: what a grammar costs per token.

    python -m raysvc.bench.structured          (or: raysvc bench structured)

One process, one engine, the same prompts, batch (32 by default) and output length:
plain decoding (ignore_eos) against decoding held to a JSON schema that cannot finish
before `max_tokens` (an array of at least 10 000 small integers), so both runs generate
exactly the same number of tokens per sequence and the ratio is the grammar's cost
alone: filling a bitmask per sequence per step (on a thread beside the forward pass),
masking the logits rows, advancing the matcher. The runs alternate (plain, schema, plain,
...); printed are each one's best and the median of the pairwise ratios, as the machine
is shared. Also printed: a realistic schema's compile time, cold and cached.
"""

from __future__ import annotations

import argparse
import time

SCHEMA = {"type": "array", "minItems": 10_000,
          "items": {"type": "integer", "minimum": 0, "maximum": 99}}
PET = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags"],
       "properties": {"name": {"type": "string", "maxLength": 20},
                      "kind": {"enum": ["cat", "dog", "bird"]},
                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}}
PROMPTS = ["The list type", "A dictionary", "The while statement", "Exceptions are",
           "The import system", "def f(x):", "Strings are", "The for statement"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="raysvc bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)

    from raysvc import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.batch)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    runs = {
        "plain": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
        "json schema": SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                      structured_outputs={"json": SCHEMA}),
    }
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    best = dict.fromkeys(runs, 0.0)
    ratios = []
    for _ in range(args.repeats):
        rates = {}
        for name, params in runs.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if tokens != args.batch * args.max_tokens:
                raise AssertionError(f"{name}: {tokens} tokens, expected "
                                     f"{args.batch * args.max_tokens}")
            rates[name] = tokens / seconds
            best[name] = max(best[name], rates[name])
        ratios.append(rates["json schema"] / rates["plain"])
    engine = llm.engine
    start = time.perf_counter()
    engine.grammars.compile(SamplingParams(structured_outputs={"json": PET}).structured_outputs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    engine.grammars.compile(SamplingParams(structured_outputs={"json": PET}).structured_outputs)
    cached = time.perf_counter() - start
    print(f"batch {args.batch}, {args.max_tokens} output tokens per sequence, "
          f"device {engine.device}, dtype {engine.dtype}")
    for name, rate in best.items():
        print(f"  {name:12s} {rate:9.1f} output tok/s")
    ratio = best["json schema"] / best["plain"]
    median = sorted(ratios)[len(ratios) // 2]
    print(f"  json schema / plain: best {ratio:.3f} ({(1 - ratio) * 100:+.1f}% slower), median "
          f"of {len(ratios)} pairs {median:.3f} ({(1 - median) * 100:+.1f}%); goal <= 10%")
    print(f"  compile of a 3-field schema: {cold * 1e3:.1f} ms cold, {cached * 1e3:.3f} ms "
          "cached")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
