"""Compile the Triton kernels for a GPU that is not here, and report their resource use.

    python -m raysvc_kernels.triton_compile_check [--arch 90]

The interpreter (CPU tests) runs the kernels as numpy, so it never sees the real
compiler: a construct it accepts may not compile, and a tile config may spill registers
or overflow shared memory. Triton compiles to cubin without a device (ptxas ships in
its wheel), so this builds each launcher's config for `--arch` with the specialisations
a launch would get, and prints registers, spills and shared memory per config.
Needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from raysvc_kernels import triton_attention, triton_decode, triton_store
from raysvc_kernels.triton_common import next_pow2, padded_head_dim

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Ints a launch does not see as multiples of 16 (everything else: pointers, strides, is).
NOT_DIVISIBLE = {"num_seqs", "num_splits", "stride_bt", "qk_scale"}


def compile_one(fn: object, types: dict[str, str], constexprs: dict[str, object],
                num_warps: int, num_stages: int, arch: int) -> dict[str, object]:
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in NOT_DIVISIBLE}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    info = {"shared": kernel.metadata.shared, "wgmma": "wgmma" in kernel.asm["ptx"]}
    info.update(_ptxas_usage(kernel.asm["ptx"], arch))
    return info


def _ptxas_usage(ptx: str, arch: int) -> dict[str, object]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", path,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spills.group(1)) if spills else None}


def _ptr_types(dtype: torch.dtype, names: list[str], extra: dict[str, str]) -> dict[str, str]:
    types = {n: "*" + TYPES[dtype] for n in names}
    return {**types, **extra, "qk_scale": "fp32"}


def unified(dtype: torch.dtype, head_dim: int, block_size: int, gqa: int, max_query_len: int,
            arch: int, config: triton_attention.UnifiedConfig | None = None) -> dict:
    cfg = config or triton_attention.unified_config(max_query_len, gqa, head_dim, dtype)
    types = _ptr_types(dtype, ["q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"],
                       {n: "*i32" for n in ["block_tables_ptr", "query_start_loc_ptr",
                                            "seq_lens_ptr"]})
    ce = dict(GQA=gqa, HEAD_DIM=head_dim, HEAD_DIM_PAD=padded_head_dim(head_dim),
              BLOCK_SIZE=block_size, BLOCK_Q=cfg.block_m // gqa, BLOCK_M=cfg.block_m,
              TILE_N=cfg.tile_n, UPCAST=False,
              DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    info = compile_one(triton_attention._unified_attention_kernel, types, ce, cfg.num_warps,
                       cfg.num_stages, arch)
    return {"config": cfg, **info}


def split_kv(dtype: torch.dtype, head_dim: int, block_size: int, gqa: int, arch: int) -> dict:
    cfg = triton_decode.split_config(head_dim, dtype)
    types = _ptr_types(dtype, ["q_ptr", "k_cache_ptr", "v_cache_ptr"],
                       {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                        **{n: "*i32" for n in ["block_tables_ptr", "query_start_loc_ptr",
                                               "seq_lens_ptr"]}})
    ce = dict(NUM_HEADS=8 * gqa, GQA=gqa, HEAD_DIM=head_dim,
              HEAD_DIM_PAD=padded_head_dim(head_dim), BLOCK_SIZE=block_size,
              BLOCK_H=max(16, next_pow2(gqa)), TILE_N=cfg.tile_n, UPCAST=False,
              DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    info = compile_one(triton_decode._split_kv_kernel, types, ce, cfg.num_warps,
                       cfg.num_stages, arch)
    return {"config": cfg, **info}


def merge(dtype: torch.dtype, head_dim: int, splits: int, arch: int) -> dict:
    types = {"out_ptr": "*" + TYPES[dtype], "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
             "query_start_loc_ptr": "*i32"}
    ce = dict(NUM_HEADS=32, HEAD_DIM=head_dim, HEAD_DIM_PAD=padded_head_dim(head_dim),
              SPLITS_PAD=next_pow2(splits))
    return compile_one(triton_decode._merge_splits_kernel, types, ce, 4, 1, arch)


def store(dtype: torch.dtype, head_dim: int, kv_heads: int, block_size: int, arch: int) -> dict:
    types = _ptr_types(dtype, ["k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr"],
                       {"slot_mapping_ptr": "*i64"})
    ce = dict(NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, HEADS_PAD=next_pow2(kv_heads),
              HEAD_DIM_PAD=next_pow2(head_dim), BLOCK_SIZE=block_size)
    return compile_one(triton_store._store_kv_kernel, types, ce, 4, 1, arch)


def default_checks(arch: int, quick: bool = False) -> list[tuple[str, dict]]:
    """(label, info) for the configs the launchers pick on common shapes."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    checks = [
        ("unified decode bf16 d128 gqa4 bs16", lambda: unified(bf16, 128, 16, 4, 1, arch)),
        ("unified prefill fp16 d80 gqa7 bs32", lambda: unified(fp16, 80, 32, 7, 4096, arch)),
        ("split-KV bf16 d128 gqa4 bs16", lambda: split_kv(bf16, 128, 16, 4, arch)),
        ("merge bf16 d128 x64", lambda: merge(bf16, 128, 64, arch)),
        ("store_kv fp16 d128 kvh8 bs16", lambda: store(fp16, 128, 8, 16, arch)),
    ]
    if not quick:
        checks += [
            ("unified prefill bf16 d128 gqa4 bs16", lambda: unified(bf16, 128, 16, 4, 4096, arch)),
            ("unified prefill fp16 d256 gqa4 bs16", lambda: unified(fp16, 256, 16, 4, 4096, arch)),
            ("unified prefill fp32 d128 gqa8 bs16", lambda: unified(fp32, 128, 16, 8, 4096, arch)),
            ("unified verify bf16 d64 gqa8 bs32", lambda: unified(bf16, 64, 32, 8, 5, arch)),
            ("unified prefill fp16 d16 mha bs8", lambda: unified(fp16, 16, 8, 1, 512, arch)),
            ("split-KV fp16 d256 gqa8 bs16", lambda: split_kv(fp16, 256, 16, 8, arch)),
            ("split-KV fp32 d80 mha bs32", lambda: split_kv(fp32, 80, 32, 1, arch)),
        ]
    return [(label, fn()) for label, fn in checks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="only the five most used kernels")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    bad = 0
    for label, info in default_checks(args.arch, args.quick):
        spilled = bool(info.get("spill_bytes"))
        bad += spilled
        print(f"{label}: {info}{'  <-- SPILLS' if spilled else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
