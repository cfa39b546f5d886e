"""The inner step both attention kernels share: one tile of keys, one online-softmax update.

Online softmax (Milakov & Gimelshein; FlashAttention): for each row keep the running
max `m`, the running sum `l` of exp(score - m) and the unnormalised output `acc`.
A new tile with scores s rescales the old state by alpha = exp(m_old - m_new) and
adds exp(s - m_new). Scores are kept in log2 units (the softmax scale is multiplied
by log2(e) once on the host) so every exponential is a cheap exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_kv_tile(
    cache_ptr,
    row_off,  # [TILE_N] int64 element offset of each key's (block, slot, kv_head) row
    d,  # [HEAD_DIM_PAD]
    in_ctx,  # [TILE_N] bool, only read when MASK_KEYS
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    ptrs = cache_ptr + row_off[:, None] + d[None, :]
    if MASK_KEYS:
        mask = in_ctx[:, None] & (d < HEAD_DIM)[None, :]
        return tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM_PAD != HEAD_DIM:
        return tl.load(ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def attend_tile(
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32 unnormalised output
    m_i,  # [BLOCK_M] fp32 running max (log2 units)
    l_i,  # [BLOCK_M] fp32 running sum of exp2(s - m_i)
    q,  # [BLOCK_M, HEAD_DIM_PAD] query rows (already in the dot dtype)
    q_pos,  # [BLOCK_M] int32 absolute position of each row's query token
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,  # pointer to block_tables[seq, 0]
    kv_head,
    tile_start,  # first context position of this tile
    seq_len,
    qk_scale,  # softmax scale * log2(e)
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,  # False only for tiles every row sees in full
    UPCAST: tl.constexpr,  # do the dots in fp32 (the interpreter cannot do bf16 dots)
    DOT_PRECISION: tl.constexpr,
):
    pos = tile_start + tl.arange(0, TILE_N)
    in_ctx = pos < seq_len
    # The block table is read per tile, so a tile may span several (scattered) blocks.
    if CAUSAL_MASK:
        blk = tl.load(block_table_row + pos // BLOCK_SIZE, mask=in_ctx, other=0)
    else:
        blk = tl.load(block_table_row + pos // BLOCK_SIZE)
    blk = blk.to(tl.int64)  # pools of >2**31 elements: never multiply in int32
    in_block = pos % BLOCK_SIZE
    k_row = blk * stride_kb + in_block * stride_ks + kv_head * stride_kh
    v_row = blk * stride_vb + in_block * stride_vs + kv_head * stride_vh
    k = _load_kv_tile(k_cache_ptr, k_row, tl.arange(0, HEAD_DIM_PAD), in_ctx, HEAD_DIM,
                      HEAD_DIM_PAD, CAUSAL_MASK)
    v = _load_kv_tile(v_cache_ptr, v_row, tl.arange(0, HEAD_DIM_PAD), in_ctx, HEAD_DIM,
                      HEAD_DIM_PAD, CAUSAL_MASK)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:
        k = k.to(q.dtype)
        v = v.to(q.dtype)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
    if CAUSAL_MASK:
        visible = (pos[None, :] <= q_pos[:, None]) & in_ctx[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen nothing yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
    shift = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.math.exp2(s - shift[:, None])
    alpha = tl.math.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
