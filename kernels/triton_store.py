"""Triton twin of `torch_ref.store_kv`: scatter new tokens' K/V into the paged pool.

One program per token copies all of that token's KV heads (a few KB), so the launch
is one kernel for the whole step regardless of how tokens map onto blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raysvc_kernels.triton_common import check_pool, last_dim_contiguous, next_pow2


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE

    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    tok64 = tok.to(tl.int64)

    k = tl.load(k_ptr + tok64 * stride_kt + (h * stride_kh)[:, None] + d[None, :], mask=mask)
    v = tl.load(v_ptr + tok64 * stride_vt + (h * stride_vh)[:, None] + d[None, :], mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + (h * stride_kch)[:, None] + d[None, :]
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + (h * stride_vch)[:, None] + d[None, :]
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = skip
) -> None:
    """Scatter new K/V into the pool at flat slots (block * block_size + offset); -1 skips."""
    check_pool(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the pool's "
            f"[num_kv_heads, head_dim] = {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_pow2(num_kv_heads),
        HEAD_DIM_PAD=next_pow2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
