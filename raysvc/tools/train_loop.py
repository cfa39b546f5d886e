"""The training loop of the tiny models: seeded random windows, AdamW + cosine, distillation.

Distillation: the draft's loss is w · KL(p_target ‖ p_draft) + (1 − w) · CE(next token), with
both distributions at temperature 1 over every position of the row (soft targets from the
teacher's logits; the CE term keeps it anchored to the data).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from raysvc.tools.tiny_eval import perplexity


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Batches:
    """Random windows of seq_len tokens from the packed training stream (seeded)."""

    def __init__(self, stream: list[int], seq_len: int, batch_size: int, seed: int):
        self.data = torch.tensor(stream, dtype=torch.long)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:  # [batch_size, seq_len]
        starts = torch.randint(
            0, len(self.data) - self.seq_len, (self.batch_size,), generator=self.gen
        )
        return torch.stack([self.data[s : s + self.seq_len] for s in starts.tolist()])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    model,
    batches: Batches,
    steps: int,
    peak_lr: float,
    args,
    name: str,
    eval_rows: torch.Tensor,
    teacher=None,
) -> None:
    """AdamW + cosine. With a teacher: w * KL(teacher || model) + (1 - w) * CE (distillation)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast)
    start, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, args.warmup)
        rows = batches.next()  # [b, seq_len]
        model.train()
        with autocast:
            logits = model(input_ids=rows).logits[:, :-1].float()  # [b, seq_len-1, vocab]
            vocab = logits.shape[-1]
            ce = F.cross_entropy(logits.reshape(-1, vocab), rows[:, 1:].reshape(-1))
            loss = ce
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=rows).logits[:, :-1].float()
                kl = F.kl_div(
                    F.log_softmax(logits, -1).reshape(-1, vocab),
                    F.log_softmax(t_logits, -1).reshape(-1, vocab),
                    log_target=True,
                    reduction="batchmean",
                )
                loss = args.kl_weight * kl + (1 - args.kl_weight) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            elapsed = time.time() - start
            tok_s = (step + 1) * rows.numel() / elapsed
            log(
                f"{name} step {step + 1}/{steps} loss {running:.3f} ce {ce.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {tok_s:.0f} tok/s {elapsed:.0f}s"
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            model.eval()
            with autocast:
                ppl = perplexity(model, eval_rows)
            log(f"{name} step {step + 1} held-out ppl {ppl:.2f} (first {len(eval_rows)} rows)")
