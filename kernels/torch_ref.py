"""Plain-torch twins of the paged-attention kernels.

They are the test oracle for the Triton kernels and the attention path on CPU, so they
favour clarity over speed — but not naively: attention is computed per *group* of
sequences (all decodes together, all multi-token queries together) with one padded,
masked SDPA call each, so a decode step costs one call per layer, not one per sequence.

Shapes follow the paged KV pool:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block * block_size + offset_in_block
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """Scatter new K/V into the pool at flat slots; slot -1 is skipped."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v.to(v_cache.dtype))


@dataclass(slots=True)
class _Group:
    """Sequences attended together: padded query rows and gathered context slots."""

    q_index: torch.Tensor  # [g, max_q] token index into q (clamped for padding)
    q_valid: torch.Tensor  # [g, max_q] bool
    slots: torch.Tensor  # [g, max_ctx] flat KV slot (0 where padded)
    mask: torch.Tensor  # [g, 1, max_q, max_ctx] bool, True = may attend


@dataclass(slots=True)
class AttentionPlan:
    """Gather indices and masks for one batch, shared by every layer of a step."""

    num_tokens: int
    groups: list[_Group]


def plan_attention(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. new tokens
    block_size: int,
) -> AttentionPlan:
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    is_decode = q_lens == 1
    groups = []
    for members in (is_decode.nonzero().flatten(), (~is_decode).nonzero().flatten()):
        if members.numel():
            groups.append(
                _plan_group(members, block_tables, query_start_loc, seq_lens, q_lens, block_size)
            )
    return AttentionPlan(num_tokens=int(query_start_loc[-1]), groups=groups)


def _plan_group(
    members: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    q_lens: torch.Tensor,
    block_size: int,
) -> _Group:
    device = block_tables.device
    starts = query_start_loc[:-1][members].long()
    ctx = seq_lens[members].long()
    ql = q_lens[members]
    max_q, max_ctx = int(ql.max()), int(ctx.max())

    j = torch.arange(max_q, device=device)
    q_valid = j[None, :] < ql[:, None]
    q_index = torch.where(q_valid, starts[:, None] + j[None, :], starts[:, None])
    q_pos = (ctx - ql)[:, None] + j[None, :]  # absolute position of each query

    pos = torch.arange(max_ctx, device=device)
    ctx_valid = pos[None, :] < ctx[:, None]
    blocks = block_tables[members][:, pos // block_size].long()
    slots = torch.where(ctx_valid, blocks * block_size + pos % block_size, 0)
    mask = (pos[None, None, :] <= q_pos[:, :, None]) & ctx_valid[:, None, :]
    return _Group(q_index=q_index, q_valid=q_valid, slots=slots, mask=mask[:, None])


def attend(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal attention of each query over its sequence's paged context, per plan."""
    if out is None:
        out = torch.empty_like(q)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    compute_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    for g in plan.groups:
        qg = q[g.q_index].to(compute_dtype).transpose(1, 2)  # [g, H, max_q, D]
        kg = flat_k[g.slots].to(compute_dtype).transpose(1, 2)  # [g, KVH, max_ctx, D]
        vg = flat_v[g.slots].to(compute_dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True
        ).transpose(1, 2)  # [g, max_q, H, D]
        out[g.q_index[g.q_valid]] = o[g.q_valid].to(out.dtype)
    return out


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention over the paged pool: prefill, chunked prefill, verify, decode.

    Query i of a sequence with q_len new tokens sees context positions
    <= seq_len - q_len + i; the new tokens' K/V must already be stored.
    """
    plan = plan_attention(block_tables, query_start_loc, seq_lens, k_cache.shape[1])
    return attend(q, k_cache, v_cache, plan, scale, out)
