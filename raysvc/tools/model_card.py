"""Model cards (README.md) of the built-in tiny models, filled in from the training run."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

_LICENSE = """\
## License of the training text

The corpus is text that ships with CPython {py}: `Lib/pydoc_data/topics.py` (generated from
the Python documentation) and docstrings of the standard library's `.py` files.
CPython and its documentation are licensed under the **PSF License Agreement** (Python
Software Foundation License Version 2, SPDX `PSF-2.0`; `{copyright}`).
Since Python 3.8.6, examples, recipes and other code in the documentation are additionally
available under the **Zero-Clause BSD license** (SPDX `0BSD`); the prose is PSF-2.0 only.
See <https://docs.python.org/3/license.html>. The weights ship with raysvc; whoever
redistributes them should keep this notice."""


def write(out: Path, role: str, m: dict, args: argparse.Namespace) -> None:
    is_target = role == "target"
    shape = args.target_shape if is_target else args.draft_shape
    params = m["target_params"] if is_target else m["draft_params"]
    ppl, ppl_bf16 = (
        (m["target_ppl"], m["target_ppl_bf16"])
        if is_target
        else (m["draft_ppl"], m["draft_ppl_bf16"])
    )
    c = m["corpus"]
    name = "tiny" if is_target else "tiny-draft"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: other",
        "license_name: psf-2.0",
        "tags: [llama, raysvc, tiny, test-model]",
        "---",
        "",
        f"# raysvc built-in `{name}`",
        "",
        (
            f"A {params / 1e6:.2f}M-parameter Llama model trained from scratch on Python's own "
            "documentation, for raysvc's tests, examples and CPU demos (not for real use). "
            "`tiny-draft` is its speculative-decoding draft."
            if is_target
            else f"A {params / 1e6:.2f}M-parameter Llama draft model for speculative decoding with "
            "raysvc's built-in `tiny` target: same tokenizer, distilled from the target's logits."
        ),
        "",
        "```python",
        "from raysvc.models.builtin import path",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained(path("{name}"))',
        f'tokenizer = AutoTokenizer.from_pretrained(path("{name}"))',
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        "| architecture | `LlamaForCausalLM`, tied input/output embeddings |",
        f"| parameters | {params:,} |",
        f"| hidden / layers / heads / kv heads (GQA) / intermediate | {shape.hidden} / "
        f"{shape.layers} / {shape.heads} / {shape.kv_heads} / {shape.intermediate} |",
        f"| context | {args.seq_len} tokens (RoPE θ = 10000) |",
        "| weights | safetensors, bfloat16 |",
        f"| tokenizer | byte-level BPE, {m['vocab_size']} tokens, trained on the training split |",
        "| special tokens | `<|bos|>` 0 (added by the tokenizer), `<|endoftext|>` 1 (eos, pad), "
        "`<|im_start|>` 2, `<|im_end|>` 3 |",
        "| stop tokens (generation_config) | `<|endoftext|>`, `<|im_end|>`; greedy by default |",
        "",
        "Chat template (ChatML-like): `<|bos|><|im_start|>user\\n…<|im_end|>\\n"
        "<|im_start|>assistant\\n`. About a quarter of the function/class docstrings were "
        'trained as chat turns ("What does `json.dumps` do?" → the docstring, then '
        "`<|im_end|>`), so the model knows the format; its answers are docstring-like prose "
        "and, under greedy decoding, often loop rather than reach `<|im_end|>`.",
        "",
        "## Data",
        "",
        f"CPython {m.get('python', platform.python_version())} `pydoc_data.topics` "
        "(the doc sections `help()` shows, one document per topic) and the standard library's "
        "module/class/function docstrings (found with `ast`, sorted by path; tests, demos and "
        "codec tables skipped; duplicates dropped). Held-out split: a whole topic or module is "
        "held out when `crc32(name) % 20 == 0` (`raysvc/tools/corpus.py`).",
        "",
        f"- training: {c['train_docs']:,} documents, {c['train_chars']:,} characters, "
        f"{c['train_tokens']:,} tokens",
        f"- held-out: {c['held_docs']:,} documents, {c['held_chars']:,} characters, "
        f"{c['held_tokens']:,} tokens evaluated (rows of {args.seq_len})",
        "",
        "## Training",
        "",
        "```",
        m["command"],
        "```",
        "",
        f"Seed {args.seed}, {m['threads']} CPU thread(s), bf16 autocast "
        f"{'on' if args.bf16_autocast else 'off'}, AdamW (β 0.9/0.95, weight decay 0.1), "
        f"{args.warmup} warmup steps then cosine to 10%, "
        f"{m['tokens_per_step']:,} tokens per step (random windows of the packed stream).",
        "",
        (
            f"- {m['steps']} steps at peak lr {args.lr:g}, next-token cross-entropy; "
            f"{m['target_train_s']} s wall."
            if is_target
            else f"- {m['draft_steps']} steps at peak lr {args.draft_lr:g}; loss = "
            f"{args.kl_weight:g} · KL(target ‖ draft) + {1 - args.kl_weight:g} · CE, "
            f"teacher = the saved bf16 target; {m['draft_train_s']} s wall."
        ),
        f"- whole run (tokenizer, both models, evaluation): {m['total_s']} s wall.",
        "",
        "## Held-out results",
        "",
        "Measured on the saved bf16 weights (computation in fp32; bf16 computation in brackets).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity (per token; uniform = {m['vocab_size']}) | {ppl:.2f} ({ppl_bf16:.2f}) |",
    ]
    if not is_target:
        lines += [
            f"| target perplexity | {m['target_ppl']:.2f} |",
            f"| greedy agreement α with `tiny` (argmax match, teacher-forced) | "
            f"{m['alpha']:.3f} ({m['alpha_bf16']:.3f}) |",
            f"| expected tokens per verification step, k = 4: (1 − α⁵)/(1 − α) | "
            f"{m['expected_tokens_k4']:.2f} |",
        ]
    else:
        lines += [f"| greedy agreement α of `tiny-draft` | {m['alpha']:.3f} |"]
        lines += [
            "",
            "## Sample",
            "",
            f"Greedy continuation of `{m['sample_prompt']}` (60 new tokens):",
            "",
            "```",
            m["sample_prompt"] + m["sample_greedy"],
            "```",
            "",
            "Sampled at temperature 0.5, top-k 40, `torch.manual_seed(0)`:",
            "",
            "```",
            m["sample_prompt"] + m["sample_t05"],
            "```",
        ]
    copyright_line = sys.copyright.splitlines()[0] if sys.copyright else ""
    lines += ["", _LICENSE.format(py=platform.python_version(), copyright=copyright_line), ""]
    (out / "README.md").write_text("\n".join(lines))
    (out / "training_metrics.json").write_text(json.dumps(_jsonable(m), indent=2) + "\n")


def _jsonable(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str, dict, list))}
