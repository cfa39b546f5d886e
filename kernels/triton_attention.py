"""Unified varlen paged attention (Triton): one kernel family for every step shape.

Prefill, chunked prefill on a cached prefix, multi-token verify and decode differ only
in (q_len, context length) per sequence, so one kernel serves them all — the design of
vLLM's unified Triton attention:

* grid (query block, kv_head). A program owns BLOCK_Q consecutive query tokens of one
  sequence and *all* query heads that share `kv_head` (GQA), i.e. BLOCK_M =
  BLOCK_Q * GQA rows, so each K/V tile is loaded once for the whole group.
* Query blocks are numbered per sequence from query_start_loc[s] // BLOCK_Q + s, which
  bounds their count by num_tokens // BLOCK_Q + num_seqs without a host sync; each
  program finds its sequence by binary search.
* The K/V loop walks the context in tiles of TILE_N positions, reading the block table
  per tile (`block_table[seq, pos // BLOCK_SIZE]`), with online softmax in fp32; tiles
  every row sees in full skip the causal mask. No score matrix is materialised.

Decode batches with few, long sequences go to the split-KV kernel instead
(`raysvc_kernels.triton_decode`), which spreads one sequence over many programs.
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
from raysvc_kernels.triton_decode import choose_num_splits, launch_split_kv, split_kv_worthwhile
from raysvc_kernels.triton_tile import attend_tile


@dataclass(frozen=True, slots=True)
class UnifiedConfig:
    """Tile shape of the unified kernel. block_m rows = query tokens x GQA heads."""

    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int


def unified_config(
    max_query_len: int, gqa: int, head_dim: int, dtype: torch.dtype
) -> UnifiedConfig:
    """Pick tiles for Hopper: wide row blocks for prefill, 16 rows for decode.

    Rows beyond what the longest query needs are wasted MMA work, so block_m grows
    with max_query_len * gqa up to 128 (64 for head_dim > 128, where registers run
    out). K/V tiles of 64 keys x 3 pipeline stages fit shared memory for 16-bit
    head_dim <= 128; wider heads halve the tile and the stages. fp32 dots run exactly
    ("ieee") on CUDA cores with both operands in registers, so fp32 gets small tiles.
    Checked for spills with `python -m raysvc_kernels.triton_compile_check`.
    """
    d_pad = padded_head_dim(head_dim)
    group = next_pow2(gqa)  # a program holds at least one whole head group
    rows = next_pow2(max_query_len * gqa)
    if dtype == torch.float32:
        block_m = max(min(rows, 32), 16, group)
        return UnifiedConfig(block_m, 16, 8 if block_m >= 32 else 4, 2)
    block_m = max(min(rows, 128 if d_pad <= 128 else 64), 16, group)
    if d_pad > 128:
        return UnifiedConfig(block_m, 32, 4, 2)
    return UnifiedConfig(block_m, 64, 8 if block_m >= 128 else 4, 3)


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """Last sequence s whose first query block (query_start_loc[s] // BLOCK_Q + s) <= q_block."""
    lo = num_seqs * 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Batch-dependent ints are not specialised (== 1, % 16) to avoid recompiling per batch.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _unified_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Highest query blocks first: under the causal rule they carry the most work.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_tok = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # within the sequence
    if first_tok >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # cached prefix before this step's tokens

    rows = tl.arange(0, BLOCK_M)
    tok = first_tok + rows // GQA
    head = kv_head * GQA + rows % GQA
    row_ok = (rows < BLOCK_Q * GQA) & (tok < q_len)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q_offs = (tok64 * stride_qt + head * stride_qh)[:, None] + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = ctx_len + tok  # query i sees positions <= ctx_len + i

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    lowest_pos = ctx_len + first_tok
    highest_pos = ctx_len + tl.minimum(first_tok + BLOCK_Q, q_len) - 1
    num_full = (lowest_pos + 1) // TILE_N  # tiles every row of the block sees entirely
    num_tiles = tl.cdiv(highest_pos + 1, TILE_N)
    for t in range(0, num_full):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, kv_head,
            t * TILE_N, seq_len, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb,
            stride_vs, stride_vh, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_DIM_PAD, False, UPCAST,
            DOT_PRECISION,
        )
    for t in range(num_full, num_tiles):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, kv_head,
            t * TILE_N, seq_len, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb,
            stride_vs, stride_vh, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_DIM_PAD, True, UPCAST,
            DOT_PRECISION,
        )

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # padded rows only; never stored
    o = acc / l_i[:, None]
    o_offs = (tok64 * stride_ot + head * stride_oh)[:, None] + d[None, :]
    tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def launch_unified(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    config: UnifiedConfig,
) -> torch.Tensor:
    """Launch the unified kernel with an explicit tile config (benchmarks sweep these)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    gqa = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    block_q = config.block_m // gqa
    upcast = is_interpreted(_unified_attention_kernel)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _unified_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        scale * math.log2(math.e),
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        GQA=gqa,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q=block_q,
        BLOCK_M=config.block_m,
        TILE_N=config.tile_n,
        UPCAST=upcast,
        DOT_PRECISION=dot_precision(q.dtype, upcast),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device) -> int:
    """KV splits a decode-only batch takes here (1: the unified kernel)."""
    sms = sm_count(device)
    if not split_kv_worthwhile(num_seqs, num_kv_heads, sms, max_seq_len):
        return 1
    return choose_num_splits(num_seqs, num_kv_heads, max_seq_len, sms)


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
    """Varlen causal attention over the paged pool (Triton twin of torch_ref.paged_attention).

    `max_query_len` / `max_seq_len` are hints the engine knows on the host; passing
    them avoids a device sync. Decode-only batches (max_query_len == 1) with too few
    (sequence, kv_head) pairs to fill the GPU take the split-KV path.
    """
    q, block_tables, out = check_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out
    )
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 1:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
    if max_query_len == 1:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_seq_len, q.device)
        if num_splits > 1:
            return launch_split_kv(q, k_cache, v_cache, block_tables, query_start_loc,
                                   seq_lens, scale, out, num_splits)
    config = unified_config(max(max_query_len, 1), q.shape[1] // num_kv_heads, q.shape[2],
                            q.dtype)
    return launch_unified(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                          out, config)
