"""Train raysvc's built-in tiny model pair: a ~5M Llama target and a ~1.6M draft distilled from it.

    python -m raysvc.tools.train_tiny                    # the shipped models (~24 min, 1 core)
    python -m raysvc.tools.train_tiny --steps 3 --draft-steps 3 --out-dir /tmp/tiny   # smoke

Steps: read the corpus (``corpus``: CPython's pydoc topics + stdlib docstrings, deterministic
held-out split) → train a byte-level BPE tokenizer on the training split → train the target
with next-token cross-entropy → save it in bfloat16 → distill the draft from the saved target's
logits (KL on soft targets mixed with CE) → save it → measure held-out perplexity, greedy
agreement α and expected tokens per verification step, and write both model cards.

Writes ``<out-dir>/tiny`` and ``<out-dir>/tiny-draft`` (default: the package data directories
of ``raysvc.models.builtin``), each loadable offline by ``AutoModelForCausalLM`` and
``AutoTokenizer``. Fixed seed; batches are drawn from a seeded generator, so a rerun with the
same flags and thread count gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from raysvc.tools import model_card
from raysvc.tools.corpus import split_documents
from raysvc.tools.tiny_eval import (
    expected_tokens_per_step,
    greedy_agreement,
    held_out_rows,
    perplexity,
)
from raysvc.tools.tiny_tokenizer import BOS, EOS, IM_END, encode_documents, train_tokenizer
from raysvc.tools.train_loop import Batches, log, train

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "models" / "builtin"
SAMPLE_PROMPT = "The list type"
SPEC_K = 4  # drafted tokens per verification step, for the expected-speedup figure


@dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raysvc.tools.train_tiny",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="writes OUT_DIR/tiny and OUT_DIR/tiny-draft (default: package data)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512, help="training row length and context")
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="rows per optimizer step (few rows, many steps: best for this budget)",
    )
    p.add_argument("--steps", type=int, default=1400, help="target training steps")
    p.add_argument("--draft-steps", type=int, default=800, help="draft distillation steps")
    p.add_argument("--lr", type=float, default=2e-3, help="target peak learning rate")
    p.add_argument("--draft-lr", type=float, default=3e-3, help="draft peak learning rate")
    p.add_argument("--warmup", type=int, default=40, help="linear warmup steps (both models)")
    p.add_argument(
        "--kl-weight",
        type=float,
        default=0.9,
        help="draft loss = w * KL(target || draft) + (1 - w) * CE",
    )
    p.add_argument(
        "--target-shape",
        type=_shape,
        default=Shape(256, 6, 8, 4, 688),
        metavar="H,L,NH,KV,I",
        help="hidden,layers,heads,kv_heads,intermediate",
    )
    p.add_argument(
        "--draft-shape", type=_shape, default=Shape(192, 2, 6, 3, 512), metavar="H,L,NH,KV,I"
    )
    p.add_argument(
        "--no-bf16-autocast",
        dest="bf16_autocast",
        action="store_false",
        help="train in plain fp32 (bf16 autocast is ~2x faster on AVX512-BF16 CPUs)",
    )
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument(
        "--eval-rows",
        type=int,
        default=None,
        help="cap on held-out rows for the final metrics (default: all)",
    )
    return p.parse_args(argv)


def _shape(text: str) -> Shape:
    return Shape(*(int(x) for x in text.split(",")))


def llama_config(shape: Shape, tok: PreTrainedTokenizerFast, seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def save_model(model, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # a rerun replaces the whole directory's contents
        if stale.is_file():
            stale.unlink()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)],
        pad_token_id=tok.pad_token_id,
        do_sample=False,  # greedy by default: raysvc's tests compare greedy output token for token
    )
    gen.save_pretrained(out)
    tok.save_pretrained(out)
    # Name the class users know; transformers 5 maps it to its tokenizers backend.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; package data should be world-readable


def load_fp32(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "raysvc.tools.train_tiny", *(sys.argv[1:] if argv is None else argv)]
    )
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    train_docs, held_docs = split_documents()
    tok = train_tokenizer((d.text for d in train_docs), args.vocab_size)
    assert tok.convert_tokens_to_ids([BOS, EOS]) == [0, 1]
    stream = encode_documents(train_docs, tok)
    rows = held_out_rows(tok, args.seq_len, args.eval_rows)
    corpus = {
        "train_docs": len(train_docs),
        "held_docs": len(held_docs),
        "train_chars": sum(len(d.text) for d in train_docs),
        "held_chars": sum(len(d.text) for d in held_docs),
        "train_tokens": len(stream),
        "held_tokens": rows.numel(),
        "vocab_size": len(tok),
    }
    log(f"corpus {corpus} ({time.time() - t0:.0f}s)")
    eval_rows = rows[:8]

    target_dir, draft_dir = args.out_dir / "tiny", args.out_dir / "tiny-draft"
    t1 = time.time()
    target = LlamaForCausalLM(llama_config(args.target_shape, tok, args.seq_len))
    log(f"target: {n_params(target) / 1e6:.2f}M parameters")
    train(
        target,
        Batches(stream, args.seq_len, args.batch_size, args.seed),
        args.steps,
        args.lr,
        args,
        "target",
        eval_rows,
    )
    save_model(target, tok, target_dir)
    target_s = time.time() - t1

    t2 = time.time()
    teacher = load_fp32(target_dir)  # distill from the shipped (bf16-rounded) target
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed + 1)
    draft = LlamaForCausalLM(llama_config(args.draft_shape, tok, args.seq_len))
    log(f"draft: {n_params(draft) / 1e6:.2f}M parameters")
    train(
        draft,
        Batches(stream, args.seq_len, args.batch_size, args.seed + 1),
        args.draft_steps,
        args.draft_lr,
        args,
        "draft",
        eval_rows,
        teacher=teacher,
    )
    save_model(draft, tok, draft_dir)
    draft_s = time.time() - t2

    t3 = time.time()
    metrics = evaluate(target_dir, draft_dir, rows, tok)
    metrics.update(
        corpus=corpus,
        command=command,
        threads=args.threads,
        steps=args.steps,
        draft_steps=args.draft_steps,
        tokens_per_step=args.batch_size * args.seq_len,
        target_train_s=round(target_s),
        draft_train_s=round(draft_s),
        total_s=round(time.time() - t0),
    )
    log(f"metrics {json.dumps(metrics, indent=1)} (eval {time.time() - t3:.0f}s)")
    model_card.write(target_dir, "target", metrics, args)
    model_card.write(draft_dir, "draft", metrics, args)
    log(f"wrote {target_dir} and {draft_dir} in {time.time() - t0:.0f}s")
    return metrics


def n_params(model) -> int:
    # Tied embeddings are one tensor, counted once.
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(target_dir: Path, draft_dir: Path, rows: torch.Tensor, tok) -> dict:
    """Held-out metrics of the saved (bf16) checkpoints, computed in fp32 and in bf16."""
    target, draft = load_fp32(target_dir), load_fp32(draft_dir)
    m: dict = {
        "target_params": n_params(target),
        "draft_params": n_params(draft),
        "vocab_size": len(tok),
    }
    m["target_ppl"] = perplexity(target, rows)
    m["draft_ppl"] = perplexity(draft, rows)
    m["alpha"] = greedy_agreement(draft, target, rows)
    m["expected_tokens_k4"] = expected_tokens_per_step(m["alpha"], SPEC_K)
    target_bf, draft_bf = target.to(torch.bfloat16), draft.to(torch.bfloat16)
    m["target_ppl_bf16"] = perplexity(target_bf, rows)
    m["draft_ppl_bf16"] = perplexity(draft_bf, rows)
    m["alpha_bf16"] = greedy_agreement(draft_bf, target_bf, rows)
    target.float()
    ids = tok(SAMPLE_PROMPT, return_tensors="pt")["input_ids"]
    out = target.generate(ids, max_new_tokens=60, do_sample=False)  # [1, prompt + new]
    m["sample_prompt"] = SAMPLE_PROMPT
    m["sample_greedy"] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    torch.manual_seed(0)
    out = target.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.5, top_k=40)
    m["sample_t05"] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    m["size_mb"] = {
        d.name: round(sum(f.stat().st_size for f in d.iterdir()) / 1e6, 2)
        for d in (target_dir, draft_dir)
    }
    return m


if __name__ == "__main__":
    main()
