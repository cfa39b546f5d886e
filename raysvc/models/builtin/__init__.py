"""Built-in tiny checkpoints shipped as package data, for tests, examples and CPU demos.

* ``tiny`` — a ~5M-parameter Llama target trained on CPython's own documentation;
* ``tiny-draft`` — a ~1.6M-parameter Llama draft distilled from it (same tokenizer), for
  speculative decoding.

Each is a Hugging Face directory (config, bf16 safetensors, generation config, tokenizer with
chat template, model card) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load offline.
Rebuild them with ``python -m raysvc.tools.train_tiny``.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("tiny", "tiny-draft")


def path(name: str) -> Path:
    """The directory of built-in model ``name``; ValueError for a name not in NAMES."""
    if name not in NAMES:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(NAMES)}")
    return Path(__file__).resolve().parent / name
