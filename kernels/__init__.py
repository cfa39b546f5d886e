"""Paged-attention kernels (Triton) and their plain-torch twins.

This folder installs as the top-level package ``kernels``. Hugging Face has a package of
the same import name that transformers probes for; the probe also reads the version of
the distribution that provides ``kernels`` (here raysvc's, outside the range transformers
accepts), so it stays False (``tests/test_packaging.py`` proves it).

Backends, all with the twin's signature:

* ``paged_attention`` / ``store_kv`` dispatch per call: Triton when the tensors are on
  CUDA or ``TRITON_INTERPRET=1`` is set (Triton's CPU interpreter, for tests), else the
  plain-torch twin (the CPU path of the engine).
* ``triton_paged_attention`` / ``triton_store_kv`` / ``triton_paged_decode_split_kv``
  always run Triton; ``torch_ref.paged_attention`` / ``torch_ref.store_kv`` never do.

Triton modules are imported on first use, so importing ``kernels`` needs neither a GPU
nor the interpreter. Under the interpreter, ``TRITON_INTERPRET=1`` must already be set
when a Triton module is first imported and while its kernels run.
"""

from __future__ import annotations

import os

import torch

from kernels import torch_ref

__all__ = [
    "paged_attention",
    "store_kv",
    "torch_ref",
    "triton_paged_attention",
    "triton_paged_decode_split_kv",
    "triton_store_kv",
    "uses_triton",
]


def uses_triton(x: torch.Tensor) -> bool:
    """The dispatch rule: Triton for CUDA tensors, or anywhere under Triton's interpreter."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def triton_store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """Triton `store_kv` (see kernels.triton_store)."""
    from kernels.triton_store import store_kv as impl

    impl(k, v, k_cache, v_cache, slot_mapping)


def triton_paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. the new tokens
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Triton `paged_attention` (see kernels.triton_attention); hints avoid a device sync."""
    from kernels.triton_attention import paged_attention as impl

    return impl(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out,
                max_query_len=max_query_len, max_seq_len=max_seq_len)


def triton_paged_decode_split_kv(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. the new token
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    *,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Split-KV decode (see kernels.triton_decode); every q_len must be <= 1."""
    from kernels.triton_decode import paged_decode_split_kv as impl

    return impl(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out,
                num_splits=num_splits, max_seq_len=max_seq_len)


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """Scatter new K/V into the pool at flat slots; slot -1 is skipped."""
    if uses_triton(k_cache):
        triton_store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        torch_ref.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. the new tokens
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Varlen causal paged attention; the hints are only used by (and only help) Triton."""
    if uses_triton(q):
        return triton_paged_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                      seq_lens, scale, out, max_query_len=max_query_len,
                                      max_seq_len=max_seq_len)
    return torch_ref.paged_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                     seq_lens, scale, out)
