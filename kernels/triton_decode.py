"""Split-KV decode ("flash decoding"): many programs per sequence when sequences are few.

Decode is memory bound: every step streams each sequence's whole K/V once. With one
program per (sequence, kv_head) a batch of 1-8 long sequences keeps only a handful of
SMs busy, so the context is cut into `num_splits` contiguous ranges:

1. grid (seq, kv_head, split): attend the GQA group's query heads over one range and
   write the normalised partial output and its log-sum-exp (fp32, log2 units).
2. grid (seq, head): merge the splits. With lse_j = m_j + log2(l_j) the exact result
   is sum_j 2^(lse_j - M) o_j / sum_j 2^(lse_j - M), M = max_j lse_j.

Only q_len == 1 per sequence is handled here; `paged_attention` routes other batches to
the unified kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from raysvc_kernels.triton_common import (
    check_attention_args,
    dot_precision,
    is_interpreted,
    next_pow2,
    padded_head_dim,
    sm_count,
)
from raysvc_kernels.triton_tile import attend_tile

# Below this many keys per split the merge and launch overheads outweigh the parallelism.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


SHORT_CONTEXT = 1024  # below: never split (the merge and a second launch cost more)
LONG_CONTEXT = 2048


def split_kv_worthwhile(num_seqs: int, num_kv_heads: int, num_sms: int, max_seq_len: int) -> bool:
    """Without splitting, each (seq, kv_head) is one program. Split when that leaves < 2
    programs per SM, or < 4 per SM on long contexts.

    Measured on an H200 (132 SMs; 32 q / 8 kv heads, d=128, bf16; docs/perf.md): at
    batch 64 (3.9 programs per SM) two splits reach 88% / 96% of copy bandwidth at 4k /
    32k context against 76% / 80% unsplit; at 512 context splitting lost at every batch.
    """
    if max_seq_len < SHORT_CONTEXT:
        return False
    programs = num_seqs * num_kv_heads
    return programs < 2 * num_sms or (programs < 4 * num_sms and max_seq_len >= LONG_CONTEXT)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Aim for ~4 programs per SM (hides load latency), but >= MIN_TOKENS_PER_SPLIT keys each."""
    programs = max(num_seqs * num_kv_heads, 1)
    want = triton.cdiv(4 * num_sms, programs)
    fit = max_seq_len // MIN_TOKENS_PER_SPLIT
    return max(1, min(want, fit, MAX_SPLITS))


@dataclass(frozen=True, slots=True)
class SplitConfig:
    """Tile shape of the split kernel: block_h rows hold one GQA group (padded to >= 16)."""

    tile_n: int
    num_warps: int
    num_stages: int


def split_config(head_dim: int, dtype: torch.dtype) -> SplitConfig:
    """64-key tiles x 3 stages for 16-bit head_dim <= 128; smaller where registers run out."""
    if dtype == torch.float32:
        return SplitConfig(tile_n=16, num_warps=4, num_stages=2)
    if padded_head_dim(head_dim) > 128:
        return SplitConfig(tile_n=32, num_warps=4, num_stages=2)
    return SplitConfig(tile_n=64, num_warps=4, num_stages=3)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _split_kv_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TILE_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return  # no query token for this sequence this step
    seq_len = tl.load(seq_lens_ptr + seq)

    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, num_tiles)
    num_full = seq_len // TILE_N  # tiles wholly inside the context need no mask

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GQA + rows
    row_ok = rows < GQA
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q_offs = (q_start.to(tl.int64) * stride_qt + head * stride_qh)[:, None] + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.full([BLOCK_H], 0, tl.int32) + seq_len - 1  # the one query is the last token

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t in range(t_lo, tl.minimum(t_hi, num_full)):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, kv_head,
            t * TILE_N, seq_len, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb,
            stride_vs, stride_vh, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_DIM_PAD, False, UPCAST,
            DOT_PRECISION,
        )
    for t in range(tl.maximum(t_lo, num_full), t_hi):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, kv_head,
            t * TILE_N, seq_len, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb,
            stride_vs, stride_vh, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST,
            DOT_PRECISION,
        )

    # An empty split (short sequence, many splits) records lse = -inf and o = 0.
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + split  # [BLOCK_H]
    tl.store(part_lse_ptr + part, lse, mask=row_ok)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], o,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    out_ptr,
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32
    query_start_loc_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    part = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.math.exp2(lse - m)  # 0 for empty and padded splits
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    o_offs = q_start.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(out_ptr + o_offs, res.to(out_ptr.dtype.element_ty), mask=d_ok)


def launch_split_kv(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim] (one token per sequence)
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    num_splits: int,
    config: SplitConfig | None = None,
) -> torch.Tensor:
    """Launch split + merge with checked arguments (benchmarks pass their own config)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    gqa = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    config = config or split_config(head_dim, q.dtype)
    upcast = is_interpreted(_split_kv_kernel)
    d_pad = padded_head_dim(head_dim)
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                           device=q.device)
    _split_kv_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        part_out,
        part_lse,
        block_tables,
        query_start_loc,
        seq_lens,
        scale * math.log2(math.e),
        num_splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        GQA=gqa,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=d_pad,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=max(16, next_pow2(gqa)),
        TILE_N=config.tile_n,
        UPCAST=upcast,
        DOT_PRECISION=dot_precision(q.dtype, upcast),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _merge_splits_kernel[(num_seqs, num_heads)](
        out,
        part_out,
        part_lse,
        query_start_loc,
        num_splits,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=d_pad,
        SPLITS_PAD=next_pow2(num_splits),
        num_warps=4 if head_dim * num_splits >= 2048 else 1,
    )
    return out


def paged_decode_split_kv(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim] (one token per sequence)
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, q_len 1 (or 0) per sequence
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. the new token
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    *,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Decode attention with the context split across programs (every q_len must be <= 1).

    `num_splits` defaults to the same heuristic `paged_attention` uses; that needs
    `max_seq_len` (read from seq_lens, a device sync, when not given).
    """
    q, block_tables, out = check_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out
    )
    if seq_lens.shape[0] == 0 or q.shape[0] == 0:
        return out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = choose_num_splits(seq_lens.shape[0], k_cache.shape[2], max_seq_len,
                                       sm_count(q.device))
    return launch_split_kv(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                           out, max(1, num_splits))
