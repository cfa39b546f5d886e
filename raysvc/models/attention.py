"""Attention metadata and backends: how a layer stores K/V in the paged pool and attends.

The one place that chooses a kernel: `make_backend` picks the torch twins (CPU) or the
Triton kernels (CUDA) once per engine; a CUDA graph takes the graph-safe Triton backend.

The model runner builds one `AttentionMetadata` per step; every layer reuses it. A
backend turns it into whatever its kernel needs once per step (`prepare`), so the
per-layer call does no host work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from raysvc_kernels import ops, torch_ref


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat slot per new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context incl. the new tokens
    max_query_len: int
    max_seq_len: int
    block_size: int
    plan: torch_ref.AttentionPlan | None = None


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> None: ...

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None: ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q, k, v: this step's [num_tokens, heads, head_dim], already stored in the pool."""
        ...


class TorchAttention:
    """The kernels' torch twins: the CPU path."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.plan = torch_ref.plan_attention(
            meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.block_size
        )

    def store_kv(self, k, v, k_cache, v_cache, meta):
        torch_ref.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k, v, k_cache, v_cache, meta, scale):
        return torch_ref.attend(q, k_cache, v_cache, meta.plan, scale, new_kv=(k, v))


class TritonAttention:
    """Triton kernels reading K/V straight from the pool (GPU, or CPU under TRITON_INTERPRET=1).

    `graph_safe`: always the unified kernel, whose launch grid depends on the batch shape
    alone (what a CUDA graph replays); otherwise the kernel module picks split-KV for few
    sequences on long contexts, where it reads the KV up to twice as fast."""

    name = "triton"

    def __init__(self, graph_safe: bool = False) -> None:
        self.graph_safe = graph_safe

    def prepare(self, meta: AttentionMetadata) -> None:
        pass

    def store_kv(self, k, v, k_cache, v_cache, meta):
        ops.triton_store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k, v, k_cache, v_cache, meta, scale):
        if self.graph_safe:
            from raysvc_kernels.triton_attention import launch_unified, unified_config

            gqa = q.shape[1] // k_cache.shape[2]
            return launch_unified(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                  meta.seq_lens, scale, torch.empty_like(q),
                                  unified_config(meta.max_query_len, gqa, q.shape[2], q.dtype))
        return ops.triton_paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
        )


BACKENDS = ("auto", "triton", "torch")


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """auto = Triton on CUDA, the torch twin elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend: 'triton' needs a CUDA device, or TRITON_INTERPRET=1 on CPU"
        )
    return TritonAttention() if name == "triton" else TorchAttention()
