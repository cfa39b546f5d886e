"""Triton twins of `torch_ref.lora_shrink` / `lora_expand`: batched LoRA, one launch each.

Each token reads its own adapter's weights (`slots[t]`, -1 = none), so a step mixing
many adapters and base rows costs two launches per fused linear (Punica's BGMV). The
rank side is small (G * max_lora_rank), so a program holds a token's whole rank vector
and reduces with `tl.sum` (no `tl.dot`: decode rows are single tokens, and the
interpreter computes 16-bit dots wrongly). Accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raysvc_kernels.triton_common import next_pow2


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, y_ptr, K, R,
                   stride_xt, stride_as, stride_ar, stride_yt,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t * stride_xt + k, mask=k < K, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :],
                        mask=(r[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(y_ptr + t * stride_yt + r, acc, mask=r < R)


@triton.jit
def _expand_kernel(y_ptr, b_ptr, slots_ptr, out_ptr, N, R,
                   stride_yt, stride_bs, stride_bn, stride_br, stride_ot,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        y = tl.load(y_ptr + t * stride_yt + r, mask=r < R, other=0.0)
        b = tl.load(b_ptr + slot * stride_bs + n[:, None] * stride_bn + r[None, :] * stride_br,
                    mask=(n[:, None] < N) & (r[None, :] < R), other=0.0).to(tl.float32)
        delta = tl.sum(b * y[None, :], axis=1)
        mask = n < N
        old = tl.load(out_ptr + t * stride_ot + n, mask=mask, other=0.0)
        tl.store(out_ptr + t * stride_ot + n, (old.to(tl.float32) + delta).to(old.dtype),
                 mask=mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """y[t] = a[slots[t]] @ x[t] (fp32; zeros where slots[t] < 0)."""
    T, K = x.shape
    R = a.shape[1]
    assert x.stride(1) == 1 and a.stride(2) == 1
    y = torch.empty(T, R, dtype=torch.float32, device=x.device)
    if T:
        _shrink_kernel[(T,)](x, a, slots, y, K, R, x.stride(0), a.stride(0), a.stride(1),
                             y.stride(0), BLOCK_R=next_pow2(R),
                             BLOCK_K=max(16, min(128, next_pow2(K))))
    return y


def lora_expand(y: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                out: torch.Tensor) -> None:
    """out[t] += b[slots[t]] @ y[t] where slots[t] >= 0, in place. `b` may be a strided
    view (the engine passes its transposed stack)."""
    T, R = y.shape
    N = b.shape[1]
    assert out.stride(1) == 1
    if T:
        block_n = 64
        _expand_kernel[(T, triton.cdiv(N, block_n))](
            y, b, slots, out, N, R, y.stride(0), b.stride(0), b.stride(1), b.stride(2),
            out.stride(0),
            BLOCK_R=next_pow2(R), BLOCK_N=block_n)
