"""Finding what an engine runs: the checkpoint directory (the built-in models by name),
the device, the tokenizer, the end-of-sequence ids, a draft model's dtype. The engine
uses these at start-up; the draft pool, the ingress and batch actors import them too."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raysvc.models.config import ModelConfig


def draft_dtype(target_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The draft model's dtype: the target's, except float32 on CPU. A draft round
    multiplies a few rows by small weights, where CPU bf16/fp16 matmuls pay a fixed cost
    per call (the built-in draft's round: 0.80 ms bf16, 0.57 ms fp32; docs/perf.md). Any
    dtype is lossless: the target verifies every proposal."""
    return torch.float32 if device.type == "cpu" else target_dtype


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        from raysvc.models.builtin import path

        return path("tiny")
    if model in ("tiny", "tiny-draft"):
        from raysvc.models.builtin import path

        return path(model)
    return Path(model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported (cpu or cuda)")
    return resolved


def load_tokenizer(path: Path):
    """The checkpoint's Hugging Face tokenizer, or None when it ships none (token ids only)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(path: Path, config: ModelConfig, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids as `generate` sees them: generation_config.json first."""
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    if config.eos_token_ids:
        return config.eos_token_ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (tokenizer.eos_token_id,)
    return ()
