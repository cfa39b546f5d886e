"""The `raysvc` command line: generate text, run benchmarks."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _set_process_env() -> None:
    # Ray >= 2.60 turns token auth on and its CLI then fails with "Authentication
    # required"; raysvc starts its own local Ray, so it says what it needs here, not in
    # the user's shell.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _generate(args: argparse.Namespace) -> int:
    from raysvc import LLM, SamplingParams

    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        outputs = llm.generate(args.prompts, params)
    except ValueError as e:
        print(f"raysvc generate: error: {e}", file=sys.stderr)
        return 2
    for out in outputs:
        completion = out.outputs[0]
        print(f"{out.prompt!r} -> {completion.text!r}  [{completion.finish_reason}, "
              f"{len(completion.token_ids)} tokens]")
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.what == "engine":
        from raysvc.bench.engine import main as bench_main
    else:
        from raysvc.bench.kernels import main as bench_main
    bench_main(rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysvc", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts (offline, one device)")
    gen.add_argument("prompts", nargs="*", default=["The list type"])
    gen.add_argument("--model", default=None, help="checkpoint directory (default: built-in tiny)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)

    bench = sub.add_parser("bench", help="benchmarks (the rest of the arguments go to them)")
    bench.add_argument("what", choices=["engine", "kernels"])
    return parser


def main(argv: list[str] | None = None) -> int:
    _set_process_env()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _generate(args)
    return _bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
