"""Engine benchmark: raysvc vs Hugging Face transformers on one model and one workload.

    python -m raysvc.bench.engine            # or: raysvc bench engine

One run, same process, same model, same requests (fixed seed; prompt and output lengths
drawn uniformly; ignore_eos so every request produces exactly its output length):

- raysvc `LLM.generate` (continuous batching, chunked prefill, paged KV);
- HF `generate` with static, left-padded batches of 8 and 32 — a batch runs until its
  longest request is done, so only the requested tokens are counted as useful output;
- HF's own continuous batching (`ContinuousBatchingManager`, the engine behind
  `generate_batch`), fed each request's own max_new_tokens.

Prints output tokens/s for each, raysvc's speed-up over each, and whether greedy outputs
agree with HF's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  vocab: int, seed: int) -> Workload:
    g = torch.Generator().manual_seed(seed)
    prompts, outs = [], []
    for _ in range(n):
        p = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        o = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g))
        prompts.append(torch.randint(3, vocab, (p,), generator=g).tolist())
        outs.append(o)
    return Workload(prompts, outs)


def random_checkpoint(path: str, seed: int, max_len: int = 1024) -> None:
    """A random Llama of the built-in model's size class (6 layers, hidden 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=max_len, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider logits: greedy choices not decided by rounding noise
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)


def run_raysvc(path: str, w: Workload, args, **engine_kwargs) -> tuple[float, list[list[int]]]:
    from raysvc import LLM, SamplingParams

    llm = LLM(path, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, **engine_kwargs)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in w.output_lens]
    llm.generate(w.prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(w.prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, [o.outputs[0].token_ids for o in outs]


def run_hf_static(model, w: Workload, batch_size: int) -> tuple[float, list[list[int]]]:
    results: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(w.prompts), batch_size):
        prompts = w.prompts[i: i + batch_size]
        lens = w.output_lens[i: i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding, as decoder-only generate expects
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        results += [out[row, width: width + n].tolist() for row, n in enumerate(lens)]
    return time.perf_counter() - start, results


def run_hf_continuous(model, w: Workload) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(w.output_lens),
                              eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
               for i, (p, n) in enumerate(zip(w.prompts, w.output_lens, strict=True))]
        done: dict[str, list[int]] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                done[result.request_id] = list(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("HF continuous batching stopped early")
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return elapsed, [done[i][:n] for i, n in zip(ids, w.output_lens, strict=True)]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, ref, strict=True))
    return f"{same}/{len(ref)} identical"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="raysvc bench engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: a random Llama, 6 layers)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--skip", nargs="*", default=[], choices=["static8", "static32", "cb"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tmp
        if not args.model:
            random_checkpoint(tmp, args.seed)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        w = make_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len),
                          hf.config.vocab_size, args.seed)
        print(f"model {args.model or 'random Llama (6 layers, hidden 256)'}; "
              f"{args.num_requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]}, "
              f"outputs {args.output_len[0]}-{args.output_len[1]} tokens "
              f"({w.output_tokens} output tokens); {args.threads} threads")

        rows: list[tuple[str, float, list[list[int]] | None, str]] = []
        t, ours = run_raysvc(path, w, args)
        rows.append(("raysvc LLM.generate", t, ours, ""))
        runs = [("static8", "HF generate, static batch 8", lambda: run_hf_static(hf, w, 8)),
                ("static32", "HF generate, static batch 32", lambda: run_hf_static(hf, w, 32)),
                ("cb", "HF continuous batching", lambda: run_hf_continuous(hf, w))]
        for key, name, fn in runs:
            if key in args.skip:
                continue
            try:
                t, toks = fn()
                rows.append((name, t, toks, ""))
            except Exception as e:  # report, keep the other rows
                rows.append((name, float("nan"), None, f"failed: {type(e).__name__}: {e}"[:120]))

    ours_tps = w.output_tokens / rows[0][1]
    print("\n| engine | seconds | output tok/s | raysvc speed-up | greedy vs raysvc |")
    print("|---|---:|---:|---:|---|")
    for name, t, toks, note in rows:
        tps = w.output_tokens / t
        speedup = "1.00x" if toks is ours else f"{ours_tps / tps:.2f}x"
        agree = note or ("-" if toks is ours else agreement(ours, toks))
        print(f"| {name} | {t:.2f} | {tps:.0f} | {speedup} | {agree} |")


if __name__ == "__main__":
    main()
