"""Held-out metrics of the tiny model pair: perplexity, greedy agreement, expected speedup.

Terms:

* *held-out rows* — the held-out documents (see ``corpus``) encoded as one token stream and cut
  into non-overlapping rows of ``seq_len`` tokens (the last partial row is dropped);
* *perplexity* — exp(mean next-token negative log-likelihood) over every predicted position;
* *greedy agreement* α — the fraction of positions where the draft's argmax equals the
  target's argmax, both teacher-forced on the same held-out rows;
* *expected tokens per verification step* for k drafted tokens — (1 − α^(k+1)) / (1 − α),
  the mean accepted tokens plus the target's bonus/recovered token, if each drafted token is
  accepted independently with probability α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysvc.tools.corpus import held_out_documents
from raysvc.tools.tiny_tokenizer import encode_documents


def held_out_rows(tokenizer, seq_len: int, max_rows: int | None = None) -> torch.Tensor:
    """[num_rows, seq_len] int64 token ids of the held-out split."""
    stream = encode_documents(held_out_documents(), tokenizer)
    num_rows = len(stream) // seq_len
    if max_rows is not None:
        num_rows = min(num_rows, max_rows)
    return torch.tensor(stream[: num_rows * seq_len], dtype=torch.long).view(num_rows, seq_len)


@torch.no_grad()
def _logits(model, rows: torch.Tensor, batch_size: int):
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size]  # [b, seq_len]
        yield batch, model(input_ids=batch).logits.float()  # [b, seq_len, vocab]


def mean_nll(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats/token) over all rows."""
    total, count = 0.0, 0
    for batch, logits in _logits(model, rows, batch_size):
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / count


def perplexity(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    return float(torch.tensor(mean_nll(model, rows, batch_size)).exp())


@torch.no_grad()
def greedy_agreement(draft, target, rows: torch.Tensor, batch_size: int = 8) -> float:
    """α: fraction of positions where draft argmax == target argmax (teacher-forced)."""
    agree, count = 0, 0
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size]  # [b, seq_len]
        t = target(input_ids=batch).logits.argmax(-1)  # [b, seq_len]
        d = draft(input_ids=batch).logits.argmax(-1)  # [b, seq_len]
        agree += (t == d).sum().item()
        count += t.numel()
    return agree / count


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """(1 − α^(k+1)) / (1 − α): tokens a verification step yields with k drafted tokens."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
