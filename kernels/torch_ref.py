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
    """Sequences attended together: padded query rows and the blocks of their context."""

    q_index: torch.Tensor  # [g, max_q] token index into q (clamped for padding)
    q_valid: torch.Tensor  # [g, max_q] bool
    blocks: torch.Tensor  # [g, num_blocks] block ids covering the longest context
    mask: torch.Tensor  # [g, 1, max_q, num_blocks * block_size] bool, True = may attend
    fresh: bool = False  # one sequence whose context is exactly its new tokens (plain prefill)


@dataclass(slots=True)
class AttentionPlan:
    """Gather indices and masks for one batch, shared by every layer of a step."""

    num_tokens: int
    groups: list[_Group]


DECODE_BUCKET = 16  # decodes per group: bounds the padding to the bucket's longest context


def plan_attention(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. new tokens
    block_size: int,
) -> AttentionPlan:
    """Decodes are sorted by context length and attended in buckets; every multi-token
    query (prefill chunk, verification) is a group of its own, so nothing is padded much."""
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    decodes = (q_lens == 1).nonzero().flatten()
    decodes = decodes[seq_lens[decodes].argsort()]
    groups = [
        _plan_group(members, block_tables, query_start_loc, seq_lens, q_lens, block_size)
        for members in decodes.split(DECODE_BUCKET)
        if members.numel()
    ]
    groups += [
        _plan_group(member[None], block_tables, query_start_loc, seq_lens, q_lens, block_size)
        for member in (q_lens > 1).nonzero().flatten()
    ]
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
    num_blocks = -(-max_ctx // block_size)

    j = torch.arange(max_q, device=device)
    q_valid = j[None, :] < ql[:, None]
    q_index = torch.where(q_valid, starts[:, None] + j[None, :], starts[:, None])
    q_pos = (ctx - ql)[:, None] + j[None, :]  # absolute position of each query

    pos = torch.arange(num_blocks * block_size, device=device)
    blocks = block_tables[members][:, :num_blocks].long()
    ctx_valid = pos[None, :] < ctx[:, None]
    blocks = torch.where(ctx_valid[:, ::block_size], blocks, 0)  # padding entries may be junk
    mask = (pos[None, None, :] <= q_pos[:, :, None]) & ctx_valid[:, None, :]
    fresh = len(members) == 1 and max_q == max_ctx
    return _Group(q_index=q_index, q_valid=q_valid, blocks=blocks, mask=mask[:, None],
                  fresh=fresh)


def attend(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # this step's K, V [num_tokens, ...]
) -> torch.Tensor:
    """Causal attention of each query over its sequence's paged context, per plan.

    GQA without copies: the query heads sharing a KV head become extra query rows of
    that head ([g, kv_heads, group * max_q, head_dim]), so K/V are never repeated.
    A plain prefill (context = its new tokens) given `new_kv` attends to those directly
    with a causal SDPA, skipping the gather from the pool and the explicit mask.
    """
    if out is None:
        out = torch.empty_like(q)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    compute_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    for g in plan.groups:
        if g.fresh and new_kv is not None:
            rows = g.q_index[0]
            o = F.scaled_dot_product_attention(
                q[rows].to(compute_dtype).transpose(0, 1),
                new_kv[0][rows].to(compute_dtype).transpose(0, 1),
                new_kv[1][rows].to(compute_dtype).transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=True,
            )  # [H, q_len, D]
            out[rows] = o.transpose(0, 1).to(out.dtype)
            continue
        n, max_q = g.q_index.shape
        qg = q[g.q_index].to(compute_dtype)  # [g, max_q, H, D]
        qg = qg.view(n, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(n, num_kv_heads, group * max_q, head_dim)
        kg = k_cache[g.blocks].to(compute_dtype).view(n, -1, num_kv_heads, head_dim)
        vg = v_cache[g.blocks].to(compute_dtype).view(n, -1, num_kv_heads, head_dim)
        mask = g.mask.expand(n, 1, max_q, g.mask.shape[-1])
        mask = mask.unsqueeze(2).expand(n, 1, group, max_q, mask.shape[-1]).reshape(
            n, 1, group * max_q, -1)
        o = F.scaled_dot_product_attention(
            qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=mask, scale=scale
        )  # [g, KVH, group * max_q, D]
        o = o.view(n, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(n, max_q, num_kv_heads * group, head_dim)
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


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in]
    a: torch.Tensor,  # [num_slots, rank, in]
    slots: torch.Tensor,  # [num_tokens] int, -1 = no adapter
) -> torch.Tensor:  # [num_tokens, rank] float32
    """Each token times its own adapter's A (zeros for -1): batched LoRA's first half."""
    valid = slots.long() >= 0
    y = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    y[valid] = torch.einsum("tk,trk->tr", x[valid].float(), a[slots.long()[valid]].float())
    return y


def lora_expand(
    y: torch.Tensor,  # [num_tokens, rank]
    b: torch.Tensor,  # [num_slots, out, rank]
    slots: torch.Tensor,  # [num_tokens] int, -1 = no adapter
    out: torch.Tensor,  # [num_tokens, out], added to in place
) -> None:
    """out += each token's rank vector times its own adapter's B: the second half."""
    valid = slots.long() >= 0
    delta = torch.einsum("tr,tnr->tn", y[valid].float(), b[slots.long()[valid]].float())
    out[valid] = (out[valid].float() + delta).to(out.dtype)
