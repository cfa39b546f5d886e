"""The `raysvc` command line: generate text, serve the OpenAI API, run benchmarks."""

from __future__ import annotations

import argparse
import json
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
    import importlib

    module = importlib.import_module(f"raysvc.bench.{args.what.replace('-', '_')}")
    return module.main(rest) or 0


def engine_from_cli(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the engine flags (shared by serve, batch and benchmarks)."""
    engine = {name: getattr(args, name) for name in ENGINE_FLAGS
              if getattr(args, name, None) is not None}
    if args.no_prefix_caching:
        engine["enable_prefix_caching"] = False
    if args.speculative_config is not None:
        try:
            engine["speculative_config"] = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config: not JSON ({e}); e.g. "
                             '\'{"method": "draft_model", "num_speculative_tokens": 4}\'') from None
    if args.enable_lora or args.lora_modules:
        engine["enable_lora"] = True
    if args.lora_modules:
        engine["lora_modules"] = parse_lora_modules(args.lora_modules)
    return engine


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    """vLLM's --lora-modules: `name=path` or `{"name": ..., "path": ...}` each; paths made
    absolute (workers may run in another directory)."""
    modules: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: {item!r} is not "
                                 '{"name": NAME, "path": DIR}') from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: {item!r} is not NAME=DIR")
        if name in modules:
            raise ValueError(f"--lora-modules: {name!r} is given twice")
        modules[name] = os.path.abspath(path)
    return modules


def _batch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from raysvc.batch.job import run

    try:
        args.engine = engine_from_cli(args)
        check_lora_modules(args.model, args.engine)
        args.concurrency = _concurrency(args.concurrency)
        if not os.path.isfile(args.input):
            raise ValueError(f"INPUT: {args.input} is not a file")
        return run(args)
    except (ValueError, ValidationError) as e:
        print(f"raysvc batch: error: {e}", file=sys.stderr)
        return 2


def _origins(text: str) -> list[str]:
    """vLLM's --allowed-origins: a JSON list (or one origin, or a comma-separated few)."""
    if text.strip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--allowed-origins: not a JSON list ({e})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("--allowed-origins: expected a JSON list of strings")
        return value
    return [o.strip() for o in text.split(",") if o.strip()]


def _concurrency(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise ValueError(f"--concurrency: expected N or MIN,MAX (1 <= MIN <= MAX), got {text!r}")


def serve_args_from_cli(args: argparse.Namespace):
    """ServeArgs from `raysvc serve` flags (shared with `raysvc bench serve`)."""
    from raysvc.serve.args import ServeArgs

    engine = engine_from_cli(args)
    autoscaling = _json_flag("--worker-autoscaling", args.worker_autoscaling,
                             '{"target_ongoing_requests": 32, "downscale_delay_s": 300}')
    placement = _json_flag("--placement", args.placement,
                           '{"pull_weight": 0, "lora_affinity_tokens": 512}')
    return ServeArgs(model=args.model, served_model_name=args.served_model_name,
                     placement=placement, num_workers=args.num_workers,
                     min_workers=args.min_workers,
                     max_workers=args.max_workers, worker_autoscaling=autoscaling, engine=engine,
                     worker_num_cpus=args.worker_cpus, worker_torch_threads=args.worker_threads,
                     stream_interval_s=args.stream_interval, max_queue_len=args.max_queue_len,
                     worker_stuck_timeout_s=args.worker_stuck_timeout,
                     api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                     max_stop_strings=args.max_stop_strings,
                     max_stop_string_length=args.max_stop_string_length,
                     max_bad_words=args.max_bad_words, max_logit_bias=args.max_logit_bias,
                     max_structured_output_bytes=args.max_structured_output_bytes,
                     max_logprobs=args.max_logprobs,
                     allow_unauthenticated=args.allow_unauthenticated,
                     metrics_public=args.metrics_public,
                     enable_fastapi_docs=args.enable_fastapi_docs,
                     ingress_replicas=args.ingress_replicas,
                     max_ongoing_requests=args.max_ongoing_requests,
                     max_queued_requests=args.max_queued_requests,
                     tool_call_parser=args.tool_call_parser,
                     trust_request_chat_template=args.trust_request_chat_template,
                     allow_runtime_lora_updating=args.allow_runtime_lora_updating,
                     allowed_origins=_origins(args.allowed_origins),
                     draft_workers=args.draft_workers,
                     draft_num_cpus=args.draft_cpus, draft_num_gpus=args.draft_gpus,
                     draft_torch_threads=args.draft_threads)


def _json_flag(flag: str, value: str | None, example: str) -> dict:
    if value is None:
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not JSON ({e}); e.g. '{example}'") from None


def check_exposure(host: str, serve_args) -> None:
    """Fail closed: no API key on an address others can reach is a choice, never a default."""
    import ipaddress

    if serve_args.resolved_api_key() or serve_args.allow_unauthenticated:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"--host {host}: serving without an API key on a non-loopback "
                         "address; set --api-key or $RAYSVC_API_KEY, or pass "
                         "--allow-unauthenticated")


def check_lora_modules(model: str | None, engine: dict) -> None:
    """Load every --lora-modules adapter against the model's config now, so a malformed
    directory fails the command (naming the file), not a worker after start-up."""
    if not engine.get("lora_modules"):
        return
    import torch

    from raysvc.engine.loading import resolve_model_path
    from raysvc.models.config import ModelConfig
    from raysvc.models.lora import load_adapter

    config = ModelConfig.from_dir(resolve_model_path(model))
    for name, path in engine["lora_modules"].items():
        load_adapter(name, path, config, engine.get("max_lora_rank", 16), torch.float32)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from raysvc.serve.launcher import serve_forever

    try:
        serve_args = serve_args_from_cli(args)
        from raysvc.engine.config import EngineConfig

        EngineConfig.from_kwargs(**{**serve_args.engine, "model": serve_args.model})
        check_lora_modules(serve_args.model, serve_args.engine)
        check_exposure(args.host, serve_args)
    except (ValueError, ValidationError) as e:
        print(f"raysvc serve: error: {e}", file=sys.stderr)
        return 2
    return serve_forever(serve_args, args.host, args.port, args.address, args.num_cpus,
                         args.drain_timeout)


# EngineConfig fields settable from the command line (name, type, help)
ENGINE_FLAGS = {
    "dtype": (str, "auto | float32 | bfloat16 | float16"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "block_size": (int, "tokens per KV block"),
    "num_kv_blocks": (int, "KV blocks per worker (default: from the memory budget)"),
    "kv_cache_memory_bytes": (int, "KV byte budget per worker"),
    "kv_offload_bytes": (int, "host memory per worker for prefix blocks evicted from the KV "
                              "pool (default: 4 GiB on GPU, off on CPU; 0: off)"),
    "gpu_memory_utilization": (float, "fraction of GPU memory a worker may use"),
    "max_num_seqs": (int, "running sequences per worker"),
    "max_num_batched_tokens": (int, "tokens per engine step"),
    "max_model_len": (int, "context length (default: the model's)"),
    "attention_backend": (str, "auto | triton | torch"),
    "seed": (int, "engine sampler seed"),
    "max_loras": (int, "LoRA adapters active in one step"),
    "max_lora_rank": (int, "the largest LoRA rank accepted"),
    "max_cpu_loras": (int, "LoRA adapters kept loaded in host memory"),
}


def add_engine_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: built-in tiny)")
    p.add_argument("--served-model-name", default=None)
    for name, (kind, text) in ENGINE_FLAGS.items():
        if name in skip:
            continue
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                   help="PEFT LoRA adapters, each served as the model NAME (implies "
                        "--enable-lora)")
    p.add_argument("--speculative-config", default=None,
                   help='JSON, as in vLLM: \'{"method": "draft_model" | "ngram", "model": PATH, '
                        '"num_speculative_tokens": 4}\'')
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs a CPU worker reserves")
    p.add_argument("--worker-threads", type=int, default=None, help="torch threads per worker")


def add_serve_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_engine_flags(p, skip)
    p.add_argument("--num-workers", type=int, default=None,
                   help="workers to start with (default: --min-workers; alone: a fixed pool)")
    p.add_argument("--min-workers", type=int, default=None,
                   help="the pool never shrinks below this (default 1 with --max-workers)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="the router scales the pool up to this with demand (default: fixed)")
    p.add_argument("--worker-autoscaling", default=None,
                   help='JSON knobs of the scaling policy, named as Ray Serve\'s: '
                        '\'{"target_ongoing_requests": 32, "upscale_delay_s": 10, '
                        '"downscale_delay_s": 300, "drain_timeout_s": 600}\'')
    p.add_argument("--placement", default=None,
                   help='JSON knobs of the router\'s placement (PlacementConfig), e.g. '
                        '\'{"pull_weight": 0}\' (no cross-worker KV pulls), '
                        '\'{"policy": "least_loaded"}\'')
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY (default: $RAYSVC_API_KEY)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the API key")
    p.add_argument("--enable-fastapi-docs", action="store_true",
                   help="serve FastAPI's /docs and /openapi.json")
    p.add_argument("--worker-stuck-timeout", type=float, default=300.0,
                   help="seconds one engine step may run before its worker counts as stuck")
    p.add_argument("--stream-interval", type=float, default=0.0,
                   help="seconds a worker waits between stream chunks of one request")
    p.add_argument("--max-queue-len", type=int, default=1024,
                   help="router queue bound; beyond it requests get 429")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--max-stop-strings", type=int, default=16,
                   help="stop strings one request may carry")
    p.add_argument("--max-stop-string-length", type=int, default=256,
                   help="characters of one stop string or bad word")
    p.add_argument("--max-bad-words", type=int, default=64)
    p.add_argument("--max-logit-bias", type=int, default=300, help="logit_bias entries")
    p.add_argument("--max-structured-output-bytes", type=int, default=65536,
                   help="size of one request's JSON schema, regex, grammar or choices")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="top alternatives per token a request may ask for (at most 20)")
    p.add_argument("--ingress-replicas", type=int, default=2,
                   help="HTTP ingress replicas (one's death cuts only its own streams)")
    p.add_argument("--max-ongoing-requests", type=int, default=1024,
                   help="requests (streams included) one ingress replica holds at once")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="Serve's proxy queue beyond those; further requests get 429")
    p.add_argument("--tool-call-parser", default="auto",
                   help="how the model writes tool calls: auto | hermes | llama3_json | mistral")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template")
    p.add_argument("--allowed-origins", default='["*"]',
                   help="CORS origins, a JSON list (default: any)")
    p.add_argument("--draft-workers", type=int, default=0,
                   help="draft-model actors serving every worker's proposals (0: each worker "
                        "drafts in process); implies a draft_model speculative config")
    p.add_argument("--draft-cpus", type=float, default=1.0, help="CPUs a draft actor reserves")
    p.add_argument("--draft-gpus", type=float, default=0.0, help="GPUs a draft actor reserves")
    p.add_argument("--draft-threads", type=int, default=None, help="torch threads per draft actor")


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

    srv = sub.add_parser("serve", help="serve the OpenAI API over HTTP (Ray Serve)")
    add_serve_flags(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--address", default=None,
                     help="Ray cluster to deploy on (default: start a local Ray)")
    srv.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM/Ctrl-C, seconds in-flight requests may finish while new "
                          "ones get 503 (a second signal stops at once)")

    batch = sub.add_parser("batch", help="run an OpenAI batch file (JSONL) through engines "
                                          "on Ray Data; resumable", description=(
        "Each INPUT line: {custom_id, method: POST, url: /v1/completions | "
        "/v1/chat/completions, body}. OUTPUT gets one line per custom_id: {id, custom_id, "
        "response: {status_code, request_id, body}, error}; rerun the same command to "
        "resume after a crash."))
    batch.add_argument("input", help="OpenAI batch file (JSONL)")
    batch.add_argument("output", help="output JSONL (appended; resumed on rerun)")
    add_engine_flags(batch)
    batch.add_argument("--concurrency", default="1",
                       help="engine actors: N (autoscaling 1..N) or MIN,MAX")
    batch.add_argument("--num-gpus-per-worker", type=float, default=None,
                       help="GPUs per engine actor (default: 1 on a GPU cluster, else 0)")
    batch.add_argument("--batch-size", type=int, default=16,
                       help="rows per Ray Data batch: the unit written as it completes (a "
                            "killed job redoes only the batches in flight); an actor runs "
                            "max_num_seqs / batch-size batches at once")
    batch.add_argument("--summary-json", default=None, help="write the summary here too")
    batch.add_argument("--overwrite", action="store_true",
                       help="start OUTPUT again instead of resuming it")
    batch.add_argument("--address", default=None,
                       help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")

    bench = sub.add_parser("bench", help="benchmarks (the rest of the arguments go to them)")
    bench.add_argument("what", choices=["engine", "kernels", "serve", "spec", "routing", "router",
                                        "prefix-cache", "autoscale", "chaos", "batch",
                                        "structured", "lora", "kv-fabric"])
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
    if args.command == "serve":
        return _serve(args)
    if args.command == "batch":
        return _batch(args)
    return _bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
