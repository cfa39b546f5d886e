"""What a proposer hands the verifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Proposal:
    tokens: list[int]  # [k] proposed next tokens
    probs: torch.Tensor | None  # [k, vocab] the distributions they were drawn from; None: one-hot
