"""Attention-kernel benchmark on one CUDA GPU: correctness, decode GB/s, prefill TFLOP/s.

    python -m raysvc.bench.kernels [--quick] [--dtype bf16] [--budget-s 210]

One run (a) checks the Triton kernels against the torch twin in fp16 and bf16,
(b) times decode over context x batch for the unified kernel and the split-KV path,
reporting bytes moved per second against a measured device-to-device copy, (c) times
causal prefill against torch SDPA's flash backend on contiguous tensors, and (d) unless
--quick, sweeps a few tile configs so the heuristics in kernels/ can be re-pinned.
Everything lands in one markdown table (stdout, and $OUT/kernels.md when OUT is set).
Each case is guarded: a failure becomes a row, and a time budget skips what is left.
Shape: Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, block 16).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DEVICE = "cuda"  # module-level so a CPU smoke run (TRITON_INTERPRET=1) can swap it
# (full, --quick) sweeps
DECODE_CONTEXTS = ([512, 2048, 4096, 8192, 16384, 32768], [512, 4096, 32768])
DECODE_BATCHES = ([1, 8, 32, 64], [1, 8, 64])
PREFILL_CASES = (  # (batch, length)
    [(8, 512), (8, 1024), (1, 2048), (8, 2048), (1, 4096), (4, 4096), (1, 8192), (4, 8192),
     (1, 16384), (1, 32768)],
    [(8, 512), (1, 2048), (4, 2048), (1, 8192), (2, 8192)],
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float16: (4e-3, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


class Report:
    """Rows of the one output table; rewritten to $OUT/kernels.md after every row."""

    HEADER = ("section", "case", "kernel", "time", "achieved", "vs reference", "note")

    def __init__(self, budget_s: float) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.deadline = time.monotonic() + budget_s

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def add(self, *cells: object) -> None:
        row = tuple(str(c) for c in cells) + ("",) * (len(self.HEADER) - len(cells))
        self.rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "kernels.md"), "w") as f:
                f.write(self.markdown() + "\n")

    def guarded(self, section: str, case: str, kernel: str, fn: Callable[..., None],
                *args: object) -> None:
        """Run fn(*args); its failure, or no time left, becomes a row instead of an abort."""
        if self.out_of_time():
            self.add(section, case, kernel, "-", "-", "-", "skipped: time budget")
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a failing case is a row, not an abort
            self.add(section, case, kernel, "-", "-", "-", f"ERROR {type(e).__name__}: "
                     + str(e).replace("\n", " ").replace("|", "/")[:160])
        finally:
            if DEVICE == "cuda":
                torch.cuda.empty_cache()

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def bench_ms(fn: Callable[[], object], quick: bool) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                    return_mode="median")


# ----------------------------------------------------------------------------- inputs


def make_pool(num_blocks: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    return (torch.randn(shape, dtype=dtype, device=DEVICE),
            torch.randn(shape, dtype=dtype, device=DEVICE))


def make_tables(seq_lens: list[int], num_blocks: int) -> torch.Tensor:
    """Scrambled block tables: distinct random pool blocks per sequence."""
    need = [math.ceil(s / BLOCK) for s in seq_lens]
    ids = torch.randperm(num_blocks, device=DEVICE)[: sum(need)].to(torch.int32)
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32, device=DEVICE)
    for i, row in enumerate(ids.split(need)):
        table[i, : len(row)] = row
    return table


def make_step(q_lens: list[int], seq_lens: list[int], heads: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, query_start_loc, seq_lens) for one step."""
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), heads, HEAD_DIM, dtype=dtype, device=DEVICE)
    return q, qsl.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


# ----------------------------------------------------------------------------- sections


def copy_bandwidth(rep: Report, quick: bool) -> float:
    """Device-to-device copy GB/s (read + write): the roofline decode is compared to."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    ms = bench_ms(lambda: x.clone(), quick)
    gbs = 2 * x.numel() / ms / 1e6
    rep.add("copy", "clone 1 GiB", "torch", f"{ms * 1e3:.0f} us", f"{gbs:.0f} GB/s", "100%",
            "peak reference (read + write)")
    return gbs


CORRECTNESS = [  # name, q_lens, seq_lens, heads, kv_heads, head_dim, block_size
    ("mixed prefill/chunk/verify/decode", [700, 256, 5, 1, 1], [700, 2304, 1029, 4000, 77],
     32, 8, 128, 16),
    ("decode long (split-KV)", [1] * 4, [8000, 3000, 17, 4097], 32, 8, 128, 16),
    ("gqa7 d80 bs32", [300, 3, 1], [300, 515, 1000], 28, 4, 80, 32),
    ("gqa4 d256 bs16", [200, 1, 1], [333, 2000, 9], 16, 4, 256, 16),
    ("mha d64 bs32", [129, 1], [129, 700], 16, 16, 64, 32),
]


def check_case(rep: Report, dtype_name: str, case: tuple) -> None:
    """Auto dispatch, forced unified and (decode) forced split-KV vs the twin on GPU."""
    from raysvc_kernels import torch_ref
    from raysvc_kernels.ops import triton_paged_attention, triton_paged_decode_split_kv
    from raysvc_kernels.triton_attention import launch_unified, unified_config

    dtype = DTYPES[dtype_name]
    name, q_lens, seq_lens, h, kvh, d, bs = case
    need = [math.ceil(s / bs) for s in seq_lens]
    shape = (sum(need) + 8, bs, kvh, d)
    kc = torch.randn(shape, dtype=dtype, device=DEVICE)
    vc = torch.randn(shape, dtype=dtype, device=DEVICE)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                       device=DEVICE)
    q = torch.randn(int(qsl[-1]), h, d, dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ids = torch.randperm(shape[0], device=DEVICE)[: sum(need)].int()
    table = torch.zeros(len(need), max(need), dtype=torch.int32, device=DEVICE)
    for i, row in enumerate(ids.split(need)):
        table[i, : len(row)] = row
    args = (q, kc, vc, table, qsl, lens, d**-0.5)
    want = torch_ref.paged_attention(*args).float()
    outs = {"auto": triton_paged_attention(*args)}
    cfg = unified_config(max(q_lens), h // kvh, d, dtype)
    outs["unified"] = launch_unified(*args, torch.empty_like(q), cfg)
    if max(q_lens) == 1:
        outs["split-KV x7"] = triton_paged_decode_split_kv(*args, num_splits=7)
    atol, rtol = TOL[dtype]
    for kernel, out in outs.items():
        err = (out.float() - want).abs()
        ok = bool((err <= atol + rtol * want.abs()).all()) and not bool(out.isnan().any())
        rep.add("correctness", f"{dtype_name} {name}", kernel, "-",
                f"max err {err.max().item():.2e}", f"atol {atol} rtol {rtol}",
                "PASS" if ok else "FAIL")


def decode_case(rep: Report, pool: tuple[torch.Tensor, torch.Tensor], batch: int, ctx: int,
                copy_gbs: float, quick: bool) -> None:
    """One (batch, context) decode step: unified kernel and split-KV, bytes moved per second."""
    from raysvc_kernels.triton_attention import launch_unified, unified_config
    from raysvc_kernels.triton_common import sm_count
    from raysvc_kernels.triton_decode import choose_num_splits, launch_split_kv, split_kv_worthwhile

    kc, vc = pool
    dtype = kc.dtype
    elem = kc.element_size()
    nbytes = batch * ctx * 2 * KV_HEADS * HEAD_DIM * elem + 2 * batch * HEADS * HEAD_DIM * elem
    sms = sm_count(kc.device)
    splits = choose_num_splits(batch, KV_HEADS, ctx, sms)
    auto_split = split_kv_worthwhile(batch, KV_HEADS, sms, ctx) and splits > 1
    q, qsl, lens = make_step([1] * batch, [ctx] * batch, HEADS, dtype)
    table = make_tables([ctx] * batch, kc.shape[0])
    args = (q, kc, vc, table, qsl, lens, HEAD_DIM**-0.5, torch.empty_like(q))
    cfg = unified_config(1, HEADS // KV_HEADS, HEAD_DIM, dtype)
    runs = [("unified", lambda: launch_unified(*args, cfg), not auto_split),
            (f"split-KV x{splits}", lambda: launch_split_kv(*args, splits), auto_split)]
    for kernel, fn, picked in runs:
        ms = bench_ms(fn, quick)
        gbs = nbytes / ms / 1e6
        rep.add("decode", f"b={batch} ctx={ctx}", kernel, f"{ms * 1e3:.1f} us",
                f"{gbs:.0f} GB/s", f"{100 * gbs / copy_gbs:.0f}% of copy",
                "auto picks" if picked else "")


def decode(rep: Report, dtype: torch.dtype, copy_gbs: float, quick: bool) -> None:
    contexts, batches = DECODE_CONTEXTS[quick], DECODE_BATCHES[quick]
    block_bytes = 2 * BLOCK * KV_HEADS * HEAD_DIM * torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 1 << 30
    want = max(batches) * math.ceil(max(contexts) / BLOCK)
    num_blocks = min(want, int(0.5 * free) // block_bytes)
    pool = make_pool(num_blocks, dtype)
    for ctx in contexts:
        for batch in batches:
            case = f"b={batch} ctx={ctx}"
            if batch * math.ceil(ctx / BLOCK) > num_blocks:
                rep.add("decode", case, "-", "-", "-", "-", "skipped: does not fit")
                continue
            rep.guarded("decode", case, "unified + split-KV", decode_case, rep, pool, batch,
                        ctx, copy_gbs, quick)


def prefill_case(rep: Report, dtype: torch.dtype, batch: int, length: int, quick: bool) -> None:
    """Causal prefill of `batch` sequences of `length` from the pool vs SDPA flash."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from raysvc_kernels.triton_attention import launch_unified, unified_config

    flops = 2 * HEADS * HEAD_DIM * length**2 * batch  # causal: half of 4*H*D*L^2
    num_blocks = batch * length // BLOCK + 8
    kc, vc = make_pool(num_blocks, dtype)
    q, qsl, lens = make_step([length] * batch, [length] * batch, HEADS, dtype)
    table = make_tables([length] * batch, num_blocks)
    args = (q, kc, vc, table, qsl, lens, HEAD_DIM**-0.5, torch.empty_like(q))
    cfg = unified_config(length, HEADS // KV_HEADS, HEAD_DIM, dtype)
    ms = bench_ms(lambda: launch_unified(*args, cfg), quick)
    qs, ks, vs = (torch.randn(batch, HEADS, length, HEAD_DIM, dtype=dtype, device=DEVICE)
                  for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref_ms = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                          quick)
    tflops, ref_tflops = flops / ms / 1e9, flops / ref_ms / 1e9
    rep.add("prefill", f"b={batch} L={length}", "unified (paged)", f"{ms:.3f} ms",
            f"{tflops:.0f} TFLOP/s", f"{tflops / ref_tflops:.2f}x SDPA-flash",
            f"SDPA-flash {ref_ms:.3f} ms = {ref_tflops:.0f} TFLOP/s (contiguous)")


def prefill(rep: Report, dtype: torch.dtype, quick: bool) -> None:
    for batch, length in PREFILL_CASES[quick]:
        rep.guarded("prefill", f"b={batch} L={length}", "unified vs SDPA-flash", prefill_case,
                    rep, dtype, batch, length, quick)


def tune_setup(dtype: torch.dtype, batch: int, q_len: int, ctx: int) -> tuple:
    num_blocks = batch * math.ceil(ctx / BLOCK) + 8
    kc, vc = make_pool(num_blocks, dtype)
    q, qsl, lens = make_step([q_len] * batch, [ctx] * batch, HEADS, dtype)
    table = make_tables([ctx] * batch, num_blocks)
    return (q, kc, vc, table, qsl, lens, HEAD_DIM**-0.5, torch.empty_like(q))


def tune_one(rep: Report, case: str, args: tuple, cfg: object, splits: int | None,
             default: bool, quick: bool) -> None:
    from raysvc_kernels.triton_attention import launch_unified
    from raysvc_kernels.triton_decode import launch_split_kv

    if splits is None:
        kernel, fn = "unified", lambda: launch_unified(*args, cfg)
    else:
        kernel, fn = f"split-KV x{splits}", lambda: launch_split_kv(*args, splits, cfg)
    ms = bench_ms(fn, quick)
    rep.add("tune", case, kernel, f"{ms * 1e3:.1f} us", "", "",
            f"{'DEFAULT ' if default else ''}{cfg}")


def tune(rep: Report, dtype: torch.dtype, quick: bool) -> None:
    """Time a few tile configs per path; the first of each list is the current default."""
    from raysvc_kernels.triton_attention import UnifiedConfig, unified_config
    from raysvc_kernels.triton_decode import SplitConfig, split_config

    gqa = HEADS // KV_HEADS
    prefill_cfgs = [unified_config(8192, gqa, HEAD_DIM, dtype)] + [
        UnifiedConfig(*c) for c in [(128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 4),
                                    (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4)]]
    decode_cfgs = [unified_config(1, gqa, HEAD_DIM, dtype)] + [
        UnifiedConfig(*c) for c in [(16, 32, 4, 3), (16, 128, 4, 2), (16, 64, 2, 3),
                                    (16, 64, 4, 4), (16, 32, 2, 4)]]
    base = split_config(HEAD_DIM, dtype)
    split_cfgs = [(base, 64), (base, 32), (base, 16)] + [
        (SplitConfig(*c), 64) for c in [(32, 4, 4), (128, 4, 2), (64, 2, 3), (128, 8, 3)]]
    plans = [("prefill b=1 L=8192", (1, 8192, 8192), [(c, None) for c in prefill_cfgs]),
             ("decode b=64 ctx=8192", (64, 1, 8192), [(c, None) for c in decode_cfgs]),
             ("decode b=1 ctx=32768", (1, 1, 32768), split_cfgs)]
    for case, shape, cfgs in plans:
        if rep.out_of_time():
            break
        args = tune_setup(dtype, *shape)
        for i, (cfg, splits) in enumerate(cfgs):
            rep.guarded("tune", case, str(cfg), tune_one, rep, case, args, cfg, splits, i == 0,
                        quick)
        del args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sweep, no config tuning")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="timing dtype")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="skip remaining cases after this many seconds (compile included)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("raysvc.bench.kernels needs a CUDA GPU (none found).", file=sys.stderr)
        return 2
    import triton

    dtype = DTYPES[args.dtype]
    rep = Report(args.budget_s)
    props = torch.cuda.get_device_properties(0)
    rep.add("env", props.name, f"torch {torch.__version__}", f"triton {triton.__version__}",
            f"{props.multi_processor_count} SMs", f"timing dtype {args.dtype}",
            f"heads {HEADS}/{KV_HEADS} d={HEAD_DIM} block={BLOCK}")
    t0 = time.monotonic()
    copy = [float("nan")]
    rep.guarded("copy", "clone 1 GiB", "torch",
                lambda: copy.__setitem__(0, copy_bandwidth(rep, args.quick)))
    for dtype_name in DTYPES:
        for case in CORRECTNESS:
            rep.guarded("correctness", f"{dtype_name} {case[0]}", "all", check_case, rep,
                        dtype_name, case)
    rep.guarded("decode", "pool", "-", decode, rep, dtype, copy[0], args.quick)
    rep.guarded("prefill", "all", "-", prefill, rep, dtype, args.quick)
    if not args.quick:
        rep.guarded("tune", "all", "-", tune, rep, dtype, args.quick)
    rep.add("total", f"{time.monotonic() - t0:.0f} s", "", "", "", "", "")
    print(rep.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
