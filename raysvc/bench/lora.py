"""Multi-LoRA benchmark: the same requests with no adapter and mixed across adapters.

    python -m raysvc.bench.lora          (or: raysvc bench lora)

One process, one model: the same prompts run (1) on an engine without LoRA, (2) on a
LoRA engine with every row naming one of `--adapters` adapters (all of them in each
step: `max_loras` = their number), and (3) on that LoRA engine with no adapter (what
enabling LoRA costs base requests). Prints output tokens/s and the ratio to (1). The
runs alternate and each keeps its best repeat (the machine is shared: the best run is
the one least disturbed). Adapters are random rank-`--rank` PEFT directories on every
target module, written here (no download, no PEFT needed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(path: Path, model_dir: str, rank: int, seed: int) -> Path:
    """A random PEFT LoRA directory for `model_dir`, in PEFT's own file layout."""
    from safetensors.torch import save_file

    from raysvc.models.config import ModelConfig
    from raysvc.models.lora import module_shapes

    config = ModelConfig.from_dir(Path(model_dir))
    shapes = module_shapes(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for module, parent in MODULES.items():
            fan_in, fan_out = shapes[module]
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": list(MODULES), "base_model_name_or_path": model_dir}))
    return path


def random_llama(path: Path, hidden: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = hidden // 64
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=6, num_attention_heads=heads,
                         num_key_value_heads=max(heads // 2, 1), vocab_size=8192,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raysvc bench lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    p.add_argument("--hidden-size", type=int, default=None,
                   help="instead: a random Llama of this width (6 layers, head_dim 64, bf16), "
                        "built here")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=32, help="requests per run")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from raysvc import LLM, SamplingParams
    from raysvc.engine.loading import resolve_model_path

    tmp = Path(tempfile.mkdtemp(prefix="raysvc-bench-lora-"))
    if args.hidden_size:
        model = random_llama(tmp / "model", args.hidden_size)
    else:
        model = str(resolve_model_path(args.model))
    loras = {f"lora-{i}": str(write_adapter(tmp / f"lora-{i}", model, args.rank, seed=i))
             for i in range(args.adapters)}
    common = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.batch,
                  enable_prefix_caching=False)
    plain = LLM(model, **common)
    lora = LLM(model, **common, enable_lora=True, max_loras=args.adapters,
               max_lora_rank=args.rank, lora_modules=loras)
    g = torch.Generator().manual_seed(0)
    vocab = plain.engine.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    names = list(loras)
    mixed = [params.model_copy(update={"lora_name": names[i % len(names)]})
             for i in range(args.batch)]
    runs = {"base model, no LoRA": (plain, params),
            f"{args.adapters} adapters mixed": (lora, mixed),
            "LoRA engine, base rows": (lora, params)}
    best = dict.fromkeys(runs, 0.0)
    for llm, ps in runs.values():  # warm-up
        llm.generate(prompts[:4], ps if isinstance(ps, SamplingParams) else ps[:4])
    for _ in range(args.repeats):
        for name, (llm, ps) in runs.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, ps)
            took = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            best[name] = max(best[name], tokens / took)

    device = str(plain.engine.device)
    print(f"machine: {os.cpu_count()} cores, {device}, torch threads {torch.get_num_threads()}")
    print(f"model: {model} ({plain.engine.dtype}); {args.batch} requests x "
          f"{args.prompt_len} prompt + {args.max_tokens} output tokens; rank {args.rank}, "
          f"all 7 modules")
    print("| run | output tok/s | vs no LoRA |")
    print("|---|---|---|")
    base = best["base model, no LoRA"]
    for name, rate in best.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": best, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
