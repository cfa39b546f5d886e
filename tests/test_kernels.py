"""Triton kernels vs their torch twins vs a float64 dense reference.

Without CUDA the Triton kernels run under Triton's CPU interpreter. The interpreter is
chosen when a kernel is *decorated* (module import) and is consulted again at launch
(triton 3.9 lazily imports modules that assert it), so TRITON_INTERPRET=1 is set while
this module imports the Triton modules (re-importing any imported without it) and, via
an autouse fixture, while each test here runs; in between the session's own setting is
restored, so this module alone never turns other modules' dispatch to Triton. Shapes
are tiny: the interpreter runs every program and every tile as Python.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from raysvc_kernels import ops, torch_ref
from raysvc_kernels.triton_common import is_interpreted

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _import_triton_modules() -> tuple[ModuleType, ...]:
    names = ("triton_tile", "triton_decode", "triton_store", "triton_attention", "triton_lora")
    if CUDA:
        return tuple(importlib.import_module(f"raysvc_kernels.{n}") for n in names)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mods = []
        for n in names:
            mod = importlib.import_module(f"raysvc_kernels.{n}")
            kernel = next(v for k, v in vars(mod).items() if k.endswith("_kernel") or
                          k == "attend_tile")
            if not is_interpreted(kernel):  # imported earlier without the interpreter
                mod = importlib.reload(mod)
            mods.append(mod)
        return tuple(mods)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


_, tdec, tstore, tattn, tlora = _import_triton_modules()


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
                self.seq_lens, self.scale)

    def poisoned_out(self) -> torch.Tensor:
        return torch.full_like(self.q, float("nan"))


def make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_blocks: int | None = None,
    min_block: int = 1,
    seed: int = 0,
    device: str = DEVICE,
    poison_tails: bool = True,
) -> Batch:
    """Random batch on a NaN-poisoned pool with scrambled block tables.

    Only the blocks a sequence owns hold finite values (block 0 too); a kernel that
    reads a wrong block, a spare block-table entry or (with `poison_tails`) a slot past
    seq_len in its last block picks up NaN and fails. The twin gathers whole blocks and
    masks, so it needs finite tails.
    """
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = num_blocks or sum(need) + min_block + 4
    perm = min_block + torch.randperm(num_blocks - min_block, generator=g)
    used, spare = perm[: sum(need)], perm[sum(need):]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for cache in (k_cache, v_cache):
        cache[0] = torch.randn(shape[1:], generator=g).to(dtype)
        cache[used] = torch.randn((len(used), *shape[1:]), generator=g).to(dtype)
    max_blocks = max(need) + 1  # one spare column that must never be read
    table = spare[torch.randint(len(spare), (len(seq_lens), max_blocks), generator=g)]
    for s, row in enumerate(used.split(need)):
        table[s, : len(row)] = row
        tail = seq_lens[s] % block_size  # slots past seq_len in the last block
        if poison_tails and row.numel() and tail:
            k_cache[row[-1], tail:] = v_cache[row[-1], tail:] = float("nan")
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn((int(qsl[-1]), num_heads, head_dim), generator=g).to(dtype)
    return Batch(q.to(device), k_cache.to(device), v_cache.to(device),
                 table.to(torch.int32).to(device), qsl.to(device),
                 torch.tensor(seq_lens, dtype=torch.int32, device=device),
                 head_dim**-0.5)


def dense_reference(b: Batch) -> torch.Tensor:
    """float64 softmax attention per sequence on a contiguous copy of its K/V."""
    q, kc, vc = (t.cpu().double() for t in (b.q, b.k_cache, b.v_cache))
    bt, qsl, lens = b.block_tables.cpu().long(), b.query_start_loc.cpu(), b.seq_lens.cpu()
    block_size, gqa = kc.shape[1], q.shape[1] // kc.shape[2]
    out = torch.zeros_like(q)
    for s in range(len(lens)):
        L, q0, q1 = int(lens[s]), int(qsl[s]), int(qsl[s + 1])
        pos = torch.arange(L)
        blocks = bt[s, pos // block_size]
        k = kc[blocks, pos % block_size].repeat_interleave(gqa, dim=1)  # [L, H, D]
        v = vc[blocks, pos % block_size].repeat_interleave(gqa, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k) * b.scale
        q_pos = L - (q1 - q0) + torch.arange(q1 - q0)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def covered(b: Batch) -> slice:
    return slice(0, int(b.query_start_loc[-1]))


def assert_matches(out: torch.Tensor, b: Batch, *, twin: bool = True) -> None:
    """All covered rows written (no NaN left from the poison), close to float64 and twin."""
    rows = covered(b)
    assert not out[rows].isnan().any(), "kernel left poisoned (unwritten) output"
    tol = TOL[b.q.dtype]
    torch.testing.assert_close(out[rows].cpu().double(), dense_reference(b)[rows], **tol)
    if twin:  # on a NaN-free copy of the pool: the twin reads (and masks) block tails
        clean = (torch.nan_to_num(b.k_cache), torch.nan_to_num(b.v_cache))
        ref = torch_ref.paged_attention(b.q, *clean, *b.args()[3:])
        torch.testing.assert_close(out[rows].float(), ref[rows].float(), **tol)


# ----------------------------------------------------------------------------- plumbing


def test_interpreter_took_effect() -> None:
    if CUDA:
        pytest.skip("CUDA present: kernels are compiled, not interpreted")
    assert is_interpreted(tattn._unified_attention_kernel)
    assert is_interpreted(tdec._split_kv_kernel)
    assert is_interpreted(tstore._store_kv_kernel)


def test_import_kernels_needs_no_triton() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, raysvc_kernels.ops, raysvc_kernels.torch_ref; "
            "assert not any(m.startswith('raysvc_kernels.triton') for m in sys.modules), "
            "sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_kernels_compile_for_hopper() -> None:
    """The interpreter never runs Triton's compiler: build the common configs for sm_90
    (no GPU needed) and require no register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "raysvc_kernels.triton_compile_check", "--quick"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("'spill_bytes': 0") == 5, run.stdout


def test_split_heuristic() -> None:
    assert tdec.split_kv_worthwhile(1, 8, 132, 4096)
    assert not tdec.split_kv_worthwhile(1, 8, 132, 512)  # short: the unified kernel wins
    assert tdec.split_kv_worthwhile(64, 8, 132, 4096)  # 3.9 programs per SM, long context
    assert not tdec.split_kv_worthwhile(64, 8, 132, 512)
    assert not tdec.split_kv_worthwhile(128, 8, 132, 32768)
    assert tdec.choose_num_splits(1, 8, 32768, 132) == 64
    assert tdec.choose_num_splits(1, 8, 300, 132) == 1  # too short to split
    assert tdec.choose_num_splits(16, 8, 8192, 132) == 5


# ----------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    num_blocks, block_size, kvh, d = 6, 8, 3, 80
    k_cache = torch.randn((num_blocks, block_size, kvh, d), generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn_like(k_cache)
    # fp32 k/v into an fp16 pool exercises the cast; the interpreter truncates fp32 -> bf16
    # (GPUs round to nearest even), so bf16 is stored from bf16.
    src_dtype = torch.float32 if dtype == torch.float16 else dtype
    fused = torch.randn((7, 2 * kvh, d), generator=g).to(src_dtype).to(DEVICE)  # k, v views
    k, v = fused[:, :kvh], fused[:, kvh:]
    slots = torch.tensor([5, -1, 47, 8, -1, 30, 0], dtype=torch.int32, device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    torch_ref.store_kv(k, v, want_k, want_v, slots)
    ops.triton_store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # int64 slots too
    ops.triton_store_kv(k * 2, v * 2, k_cache, v_cache, slots.long())
    torch_ref.store_kv(k * 2, v * 2, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# ----------------------------------------------------------------------------- unified


# (gqa, head_dim, block_size, dtype): GQA 1/2/4/8, small and non-power-of-two head dims.
CASES = [
    (1, 64, 16, torch.float32),
    (2, 80, 8, torch.float16),
    (4, 32, 32, torch.float32),
    (8, 16, 16, torch.float16),
    (4, 96, 16, torch.float32),
    (2, 128, 16, torch.float16),
    (1, 256, 32, torch.float32),
    (7, 48, 16, torch.bfloat16),  # non-power-of-two group (Qwen2-7B has 7); bf16 upcast
    (3, 80, 8, torch.float32),
]


@pytest.mark.parametrize("gqa,head_dim,block_size,dtype", CASES)
def test_paged_attention_mixed_batch(gqa: int, head_dim: int, block_size: int,
                                     dtype: torch.dtype) -> None:
    """Prefill, chunked prefill on a prefix, verify (q_len 3), decode; partial blocks."""
    b = make_batch([7, 5, 3, 1, 1], [7, 21, 12, 1, 19], num_heads=2 * gqa, num_kv_heads=2,
                   head_dim=head_dim, block_size=block_size, dtype=dtype, seed=gqa + head_dim)
    out = ops.triton_paged_attention(*b.args(), out=b.poisoned_out())
    assert_matches(out, b)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed: int) -> None:
    """Fresh random shapes: 1-4 sequences, prefixes 0-40, q_len 1-12, any GQA/dim/block."""
    g = torch.Generator().manual_seed(1000 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]
    num_seqs = pick([1, 2, 3, 4])
    q_lens = torch.randint(1, 13, (num_seqs,), generator=g).tolist()
    prefix = torch.randint(0, 41, (num_seqs,), generator=g).tolist()
    gqa, kvh = pick([1, 2, 4, 8]), pick([1, 2])
    seq_lens = [q + p for q, p in zip(q_lens, prefix, strict=True)]
    b = make_batch(q_lens, seq_lens, num_heads=gqa * kvh, num_kv_heads=kvh,
                   head_dim=pick([16, 32, 64, 80]), block_size=pick([8, 16, 32]),
                   dtype=pick([torch.float32, torch.float16, torch.bfloat16]), seed=seed)
    assert_matches(ops.triton_paged_attention(*b.args(), out=b.poisoned_out()), b)


def test_many_tiles_and_query_blocks() -> None:
    """Small tiles: several unmasked tiles, then masked ones; q_len > BLOCK_Q."""
    b = make_batch([21, 2, 1], [45, 40, 33], num_heads=4, num_kv_heads=2, head_dim=16,
                   block_size=8, dtype=torch.float32, seed=3)
    out = b.poisoned_out()
    tattn.launch_unified(*b.args(), out, tattn.UnifiedConfig(16, 16, 4, 1))
    assert_matches(out, b)


def test_hints_and_empty_sequence() -> None:
    """Host hints skip the sync; a sequence with no new token writes nothing."""
    b = make_batch([4, 0, 2], [9, 6, 17], num_heads=3, num_kv_heads=1, head_dim=32,
                   block_size=16, dtype=torch.float16, seed=4)
    out = ops.triton_paged_attention(*b.args(), out=b.poisoned_out(), max_query_len=4,
                                         max_seq_len=17)
    assert_matches(out, b)


def test_large_pool_high_block_ids() -> None:
    """>32k blocks, all in use above id 32768: block ids and offsets must not wrap."""
    b = make_batch([3, 1], [20, 13], num_heads=2, num_kv_heads=1, head_dim=8, block_size=8,
                   dtype=torch.float32, num_blocks=40_000, min_block=32_768, seed=5)
    assert int(b.block_tables[:, :2].min()) >= 32_768
    out = ops.triton_paged_attention(*b.args(), out=b.poisoned_out())
    assert_matches(out, b)


# ----------------------------------------------------------------------------- split-KV


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_kv_decode(num_splits: int, dtype: torch.dtype) -> None:
    """8 splits of a 9-token context leave empty splits; the merge must ignore them."""
    b = make_batch([1, 1, 1], [70, 9, 33], num_heads=8, num_kv_heads=2, head_dim=80,
                   block_size=16, dtype=dtype, seed=num_splits)
    out = ops.triton_paged_decode_split_kv(*b.args(), out=b.poisoned_out(),
                                               num_splits=num_splits)
    assert_matches(out, b)


def test_split_kv_small_tiles() -> None:
    b = make_batch([1, 1], [75, 40], num_heads=2, num_kv_heads=2, head_dim=16, block_size=8,
                   dtype=torch.float32, seed=7)
    out = b.poisoned_out()
    tdec.launch_split_kv(*b.args(), out, 3, tdec.SplitConfig(16, 4, 1))
    assert_matches(out, b)


def test_paged_attention_routes_long_decode_to_split_kv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = make_batch([1], [1100], num_heads=2, num_kv_heads=1, head_dim=16, block_size=32,
                   dtype=torch.float32, seed=8)
    seen = []
    launch = tattn.launch_split_kv
    monkeypatch.setattr(tattn, "launch_split_kv", lambda *a: seen.append(a[-1]) or launch(*a))
    out = ops.triton_paged_attention(*b.args(), out=b.poisoned_out(), max_query_len=1)
    assert seen == [4]  # 1100 // MIN_TOKENS_PER_SPLIT
    assert_matches(out, b)


# ----------------------------------------------------------------------------- twin


@pytest.mark.parametrize("gqa,head_dim,block_size,dtype", CASES)
def test_twin_matches_dense(gqa: int, head_dim: int, block_size: int,
                            dtype: torch.dtype) -> None:
    b = make_batch([6, 1, 4, 1], [6, 30, 17, 2], num_heads=2 * gqa, num_kv_heads=2,
                   head_dim=head_dim, block_size=block_size, dtype=dtype, device="cpu",
                   seed=gqa * head_dim, poison_tails=False)
    out = torch_ref.paged_attention(*b.args(), out=b.poisoned_out())
    assert_matches(out, b, twin=False)


# ----------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_gpu_llama_shapes(dtype: torch.dtype, gqa: int) -> None:
    """Llama-like heads, a long prefill, chunked prefill, verify and decodes together."""
    b = make_batch([700, 256, 5, 1, 1, 1], [700, 2304, 1029, 4000, 77, 1], num_heads=8 * gqa,
                   num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype, seed=gqa)
    out = ops.triton_paged_attention(*b.args(), out=b.poisoned_out())
    assert_matches(out, b)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,block_size", [(64, 32), (80, 16), (256, 16)])
def test_gpu_head_dims(dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    b = make_batch([300, 3, 1], [300, 515, 1000], num_heads=16, num_kv_heads=4,
                   head_dim=head_dim, block_size=block_size, dtype=dtype, seed=head_dim)
    assert_matches(ops.triton_paged_attention(*b.args(), out=b.poisoned_out()), b)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_split_kv(dtype: torch.dtype) -> None:
    b = make_batch([1] * 4, [8000, 3000, 17, 4097], num_heads=32, num_kv_heads=8,
                   head_dim=128, block_size=16, dtype=dtype, seed=11)
    for splits in (None, 1, 7, 64):
        out = ops.triton_paged_decode_split_kv(*b.args(), out=b.poisoned_out(),
                                                   num_splits=splits)
        assert_matches(out, b)
    assert_matches(ops.triton_paged_attention(*b.args(), out=b.poisoned_out()), b)


@gpu
@needs_cuda
def test_gpu_pool_beyond_int32_elements() -> None:
    """A real >2**31-element pool: element offsets overflow int32 unless kept in int64."""
    bs, kvh, d = 16, 8, 128
    num_blocks = 2**31 // (bs * kvh * d) + 64  # 4 GiB per fp16 pool
    shape = (num_blocks, bs, kvh, d)
    k_cache = torch.zeros(shape, dtype=torch.float16, device="cuda")
    v_cache = torch.zeros(shape, dtype=torch.float16, device="cuda")
    hi = torch.arange(num_blocks - 50, num_blocks, device="cuda", dtype=torch.int32)
    seq_lens = torch.tensor([300, 333], dtype=torch.int32, device="cuda")
    tables = torch.stack([hi[:25], hi[25:].flip(0)])  # the pool's last 50 blocks
    q = torch.randn(2, 32, d, dtype=torch.float16, device="cuda")
    k = torch.randn(633, kvh, d, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    pos = torch.cat([torch.arange(300), torch.arange(333)]).cuda()
    seq = torch.cat([torch.zeros(300), torch.ones(333)]).long().cuda()
    slots = tables[seq, pos // bs].long() * bs + pos % bs
    ops.triton_store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, kvh, d)[slots], k)
    assert torch.equal(v_cache.view(-1, kvh, d)[slots], v)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    b = Batch(q, k_cache, v_cache, tables, qsl, seq_lens, d**-0.5)
    want = torch_ref.paged_attention(*b.args())
    for out in (ops.triton_paged_attention(*b.args()),
                tattn.launch_unified(*b.args(), torch.empty_like(q),
                                     tattn.unified_config(1, 4, d, q.dtype)),
                ops.triton_paged_decode_split_kv(*b.args(), num_splits=3)):
        torch.testing.assert_close(out, want, **TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_shrink_expand_match_the_float64_twin(dtype) -> None:
    """Batched LoRA: each token uses its own slot's A and B (or none, -1); the Triton pair
    equals the torch twin run in float64 (ranks and widths not powers of two)."""
    g = torch.Generator().manual_seed(0)
    T, K, R, N, S = 7, 40, 12, 72, 3
    x = torch.randn(T, K, generator=g).to(DEVICE, dtype)
    a = torch.randn(S, R, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(S, N, R, generator=g).to(DEVICE, dtype)
    slots = torch.tensor([0, -1, 2, 2, 1, -1, 0], dtype=torch.int32, device=DEVICE)
    out = torch.randn(T, N, generator=g).to(DEVICE, dtype)

    y_ref = torch_ref.lora_shrink(x.double(), a.double(), slots).double()
    ref = out.double().clone()
    valid = slots.long() >= 0
    ref[valid] += torch.einsum("tr,tnr->tn", y_ref[valid], b.double()[slots.long()[valid]])

    y = tlora.lora_shrink(x, a, slots)
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    got = out.clone()
    tlora.lora_expand(y, b, slots, got)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    assert torch.equal(got[~valid], out[~valid])  # base rows untouched
    twin = out.clone()
    torch_ref.lora_expand(torch_ref.lora_shrink(x, a, slots), b, slots, twin)
    strided = out.clone()  # B as the engine stores it: transposed, viewed back
    tlora.lora_expand(y, b.transpose(1, 2).contiguous().transpose(1, 2), slots, strided)
    torch.testing.assert_close(strided.double(), ref, **TOL[dtype])
    torch.testing.assert_close(twin.double(), ref, **TOL[dtype])
