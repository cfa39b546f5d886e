"""Host-side helpers shared by the Triton kernels: checks, padding, device facts.

Nothing here launches a kernel; it keeps the launchers short and makes their
choices (padding, dot precision, SM count) explicit and testable.
"""

from __future__ import annotations

import functools

import torch

# The smallest tile edge tl.dot accepts on every backend; head dims and row counts
# below it are padded (and masked) up to it.
MIN_DOT = 16


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """tl.arange needs a power of two and tl.dot needs >= 16: pad, then mask."""
    return max(MIN_DOT, next_pow2(head_dim))


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (runs on CPU via numpy).

    The interpreter computes 16-bit dots on raw bits (bf16 silently wrong), so the
    launchers ask the kernels to upcast operands to fp32 when this is true.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype, upcast: bool) -> str:
    """fp32 operands must not be rounded to tf32: the CPU twin and HF run true fp32."""
    return "ieee" if upcast or dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in off CUDA (interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_pool(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The pool is written in place, so it must already have the layout the kernels index."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous along head_dim")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Inputs only need a unit stride on head_dim (a view of a fused qkv tensor is fine)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_attention_args(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    seq_lens: torch.Tensor,  # [num_seqs]
    out: torch.Tensor | None,  # [num_tokens, num_heads, head_dim]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape checks on the host (no device sync); returns (q, block_tables, out) to launch."""
    check_pool(k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [num_tokens, num_heads, {k_cache.shape[3]}], got {q.shape}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of {k_cache.shape[2]}")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} / block_tables "
            f"{tuple(block_tables.shape)} do not match {num_seqs} sequences"
        )
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with unit stride on head_dim")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    return last_dim_contiguous(q), block_tables, out
