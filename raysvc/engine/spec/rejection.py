"""Lossless verification of proposed tokens (Leviathan et al. 2023; Chen et al. 2023).

Terms, for one sequence with k proposals d_1..d_k:
- p_i: the target's distribution at position i (what plain decoding would sample from);
  q_i: the distribution d_i was drawn from (one-hot for deterministic proposers).
- accepted: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the
  first rejection.
- recovered: at the first rejection, a token drawn from normalize(max(p_i - q_i, 0)).
- bonus: when all k are accepted, one more token drawn from p_{k+1}.
Every token that comes out is then distributed exactly as under plain sampling from p.
Greedy requests reduce to: keep d_i while it equals argmax p_i, then emit argmax p_i.
"""

from __future__ import annotations

import torch


def verify_greedy(
    target_logits: torch.Tensor,  # [k + 1, vocab]
    draft: list[int],  # [k]
) -> list[int]:
    """The accepted proposals followed by the target's own next token."""
    best = target_logits.argmax(dim=-1).tolist()
    out = []
    for i, token in enumerate(draft):
        if token != best[i]:
            break
        out.append(token)
    out.append(best[len(out)])
    return out


def verify_sampled(
    p: torch.Tensor,  # [k + 1, vocab] target probabilities
    draft: list[int],  # [k]
    q: torch.Tensor | None,  # [k, vocab] draft probabilities; None = one-hot proposals
    generator: torch.Generator | None,
) -> list[int]:
    p = p.cpu().double()
    q = q.cpu().double() if q is not None else None
    uniform = torch.rand(len(draft), generator=generator, dtype=torch.float64).tolist()
    out = []
    for i, token in enumerate(draft):
        q_token = 1.0 if q is None else float(q[i, token])
        if q_token > 0 and uniform[i] * q_token <= float(p[i, token]):
            out.append(token)
            continue
        if q is None:
            residual = p[i].clone()
            residual[token] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        total = float(residual.sum())
        # p == q exactly leaves no residual mass, but then rejection has probability 0.
        dist = residual / total if total > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=generator)))
    return out
