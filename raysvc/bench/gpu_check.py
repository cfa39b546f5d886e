"""One-shot GPU check: engine correctness on CUDA, then engine throughput against HF.

    python -m raysvc.bench.gpu_check [--quick]

Made for a short lease on a lent GPU: everything runs in one call, each part guarded so
a failure is reported in its row instead of ending the run, and the tables are printed
last (and written to $OUT/gpu_check.md when OUT is set).

1. Correctness: a tiny random Llama in fp32 — raysvc greedy (Triton attention, torch
   attention) against HF `generate` on the GPU, with chunked prefill and preemption; bf16
   prefill logits against HF in bf16.
2. Throughput: a TinyLlama-shaped random model (1.1B parameters, bf16), one workload,
   raysvc vs HF `generate` with static batches vs HF continuous batching.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import traceback

import torch

ROWS: list[str] = []


def row(*cells) -> None:
    ROWS.append("| " + " | ".join(str(c) for c in cells) + " |")
    print(ROWS[-1], flush=True)


def tiny_checkpoint(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                         vocab_size=1024, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)


def check_correctness(path: str) -> None:
    from transformers import AutoModelForCausalLM

    from raysvc import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist()
               for n in (5, 17, 40, 3, 64, 9, 230, 31, 100, 700)]
    refs = []
    for p in prompts:
        out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    modes = {"batched": {"num_kv_blocks": 4096},
             "chunked": {"num_kv_blocks": 4096, "max_num_batched_tokens": 64},
             "preempt": {"num_kv_blocks": 70, "block_size": 16}}
    for backend in ("triton", "torch"):
        for mode, kw in modes.items():
            try:
                llm = LLM(path, device="cuda", attention_backend=backend, **kw)
                outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                            ignore_eos=True))
                same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, refs, strict=True))
                stats = llm.stats()
                leak = stats["kv_blocks_free"] != stats["kv_blocks_total"]
                row("greedy vs HF (fp32)", backend, mode, f"{same}/{len(refs)} identical",
                    f"preemptions {stats['num_preemptions']}" + (" LEAK" if leak else ""))
                del llm
            except Exception as e:
                row("greedy vs HF (fp32)", backend, mode, "ERROR", f"{type(e).__name__}: {e}"[:200])
                traceback.print_exc()
    try:  # prefix caching: Triton attention reading shared, cached blocks
        shared = prompts[9][:600]
        group = [shared + p[:20] for p in prompts[:6]] * 2
        runs = {}
        for caching in (False, True):
            llm = LLM(path, device="cuda", num_kv_blocks=4096, enable_prefix_caching=caching)
            runs[caching] = [o.outputs[0].token_ids for o in llm.generate(
                group, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
            runs[caching] += [o.outputs[0].token_ids for o in llm.generate(
                group, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
            stats = llm.stats()
        row("prefix cache on vs off (fp32)", "triton", "600-token shared prefix",
            f"{sum(a == b for a, b in zip(runs[False], runs[True], strict=True))}/"
            f"{len(runs[True])} identical",
            f"hits {stats['prefix_cache_hits']} / {stats['prefix_cache_queries']} tokens")
    except Exception as e:
        row("prefix cache on vs off", "triton", "", "ERROR", f"{type(e).__name__}: {e}"[:200])
        traceback.print_exc()
    for dtype in ("bfloat16", "float16"):
        try:
            llm = LLM(path, device="cuda", dtype=dtype, attention_backend="triton",
                      num_kv_blocks=4096)
            hf_half = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            hf_half = hf_half.cuda().eval()
            p = prompts[9]
            outs = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, logprobs=5,
                                                    ignore_eos=True))
            ours = outs[0].outputs[0].logprobs[0]
            with torch.no_grad():
                ref = torch.log_softmax(hf_half(torch.tensor([p], device="cuda")).logits[0, -1]
                                        .float(), -1)
            err = max(abs(lp.logprob - ref[t].item()) for t, lp in ours.items())
            row(f"last-token logprobs vs HF ({dtype})", "triton", "prefill 700",
                f"max abs err {err:.4f}", "top-1 same" if ref.argmax().item() in ours else "")
            del llm, hf_half
        except Exception as e:
            row(f"logprobs vs HF ({dtype})", "triton", "", "ERROR",
                f"{type(e).__name__}: {e}"[:200])
            traceback.print_exc()
    del hf
    torch.cuda.empty_cache()


def bench_throughput(args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from raysvc.bench.engine import make_workload, run_hf_continuous, run_hf_static, run_raysvc

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                             max_position_embeddings=4096)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()
        w = make_workload(args.num_requests, (128, 1024), (64, 256), 32000, 0)
        ns = argparse.Namespace(max_num_seqs=256, max_num_batched_tokens=8192)
        t, ours = run_raysvc(tmp, w, ns)
        ours_tps = w.output_tokens / t
        row("throughput 1.1B bf16", "raysvc LLM.generate (triton)",
            f"{t:.2f} s, {ours_tps:.0f} out tok/s", "1.00x", f"{w.output_tokens} output tokens")
        gc.collect()
        torch.cuda.empty_cache()
        t_eager, eager = run_raysvc(tmp, w, ns, enforce_eager=True)
        same = sum(a == b for a, b in zip(ours, eager, strict=True))
        row("throughput 1.1B bf16", "raysvc, no CUDA graphs (enforce_eager)",
            f"{t_eager:.2f} s, {w.output_tokens / t_eager:.0f} out tok/s",
            f"raysvc {t_eager / t:.2f}x", f"greedy {same}/{len(ours)} same as with graphs")
        gc.collect()
        torch.cuda.empty_cache()
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
        for name, fn in [("HF generate, static batch 32", lambda: run_hf_static(hf, w, 32)),
                         ("HF continuous batching", lambda: run_hf_continuous(hf, w))]:
            try:
                t2, toks = fn()
                tps = w.output_tokens / t2
                same = sum(a == b for a, b in zip(ours, toks, strict=True))
                row("throughput 1.1B bf16", name, f"{t2:.2f} s, {tps:.0f} out tok/s",
                    f"raysvc {ours_tps / tps:.2f}x", f"greedy {same}/{len(ours)} same as raysvc")
            except Exception as e:
                row("throughput", name, "ERROR", f"{type(e).__name__}: {e}"[:200], "")
                traceback.print_exc()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--only-throughput", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs CUDA")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    start = time.time()
    if not args.only_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            tiny_checkpoint(tmp)
            check_correctness(tmp)
        print(f"correctness done in {time.time() - start:.0f}s", flush=True)
    if not args.skip_throughput:
        try:
            bench_throughput(args)
        except Exception as e:
            row("throughput", "ERROR", f"{type(e).__name__}: {e}"[:200], "", "")
            traceback.print_exc()
    table = "\n".join(["| check | backend / engine | mode | result | note |",
                       "|---|---|---|---|---|", *ROWS])
    print(f"\n{torch.cuda.get_device_name()}, {time.time() - start:.0f}s\n{table}")
    if os.environ.get("OUT"):
        name = "gpu_throughput.md" if args.only_throughput else "gpu_check.md"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
