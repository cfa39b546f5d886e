"""The Triton kernels' entry points, imported lazily.

Two implementations with one signature: ``triton_paged_attention`` / ``triton_store_kv``
/ ``triton_paged_decode_split_kv`` always run Triton (on CUDA, or on CPU under
``TRITON_INTERPRET=1`` for tests); ``torch_ref.paged_attention`` / ``torch_ref.store_kv``
never do. Which one a model uses is chosen once, by the engine's attention backend
(``raysvc.models.attention.make_backend``), not per call.

Triton modules are imported on first use, so importing ``raysvc_kernels.ops`` needs neither a GPU
nor the interpreter. Under the interpreter, ``TRITON_INTERPRET=1`` must already be set
when a Triton module is first imported and while its kernels run.
"""

from __future__ import annotations

import torch

__all__ = [
    "triton_lora_expand",
    "triton_lora_shrink",
    "triton_paged_attention",
    "triton_paged_decode_split_kv",
    "triton_store_kv",
]


def triton_store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """Triton `store_kv` (see raysvc_kernels.triton_store)."""
    from raysvc_kernels.triton_store import store_kv as impl

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
    """Triton `paged_attention` (see raysvc_kernels.triton_attention); hints avoid a device sync."""
    from raysvc_kernels.triton_attention import paged_attention as impl

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
    """Split-KV decode (see raysvc_kernels.triton_decode); every q_len must be <= 1."""
    from raysvc_kernels.triton_decode import paged_decode_split_kv as impl

    return impl(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out,
                num_splits=num_splits, max_seq_len=max_seq_len)


def triton_lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Triton batched-LoRA shrink (see raysvc_kernels.triton_lora)."""
    from raysvc_kernels.triton_lora import lora_shrink as impl

    return impl(x, a, slots)


def triton_lora_expand(y: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                       out: torch.Tensor) -> None:
    """Triton batched-LoRA expand, in place (see raysvc_kernels.triton_lora)."""
    from raysvc_kernels.triton_lora import lora_expand as impl

    impl(y, b, slots, out)
