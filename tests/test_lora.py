"""Multi-LoRA against Hugging Face transformers + PEFT: the same base checkpoint and
adapter directories, loaded by PEFT (the oracle) and by raysvc (under test)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_no_leaks, hf_greedy, make_adapter
from peft import PeftModel

from raysvc import LLM, LoRARequest, SamplingParams
from raysvc.engine.loading import resolve_model_path

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

# rank, alpha, targets, rsLoRA: every module, attention only, the MLP only
ADAPTERS = {
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"], False),
    "attn": (4, 8, ["q_proj", "v_proj", "o_proj"], True),
    "mlp": (16, 16, ["gate_proj", "up_proj", "down_proj"], False),
}


def peft_model(hf, path: Path):
    return PeftModel.from_pretrained(copy.deepcopy(hf), str(path)).eval()


@pytest.fixture(scope="module")
def random_llama(make_checkpoint, tmp_path_factory):
    path, hf = make_checkpoint("llama")
    root = tmp_path_factory.mktemp("loras")
    dirs = {name: make_adapter(hf, root / name, *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}
    return path, hf, dirs


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 30, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("mode", ["batched", "chunked", "spec"])
def test_mixed_batch_matches_peft(random_llama, mode):
    """Rows of three adapters and base rows in one batch, with fewer slots than adapters
    (the scheduler takes turns): every row equals PEFT's greedy output for its adapter.
    With speculation the draft is the base model: its proposals are verified with each
    row's adapter, so the output stays the adapter's (lossless)."""
    path, hf, dirs = random_llama
    extra = {"chunked": {"max_num_batched_tokens": 24},
             "spec": {"speculative_config": {"method": "draft_model", "model": path,
                                             "num_speculative_tokens": 3}}}.get(mode, {})
    llm = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=16, **extra)
    names = [None, "all", "attn", "mlp"] * 2
    requests = [None if n is None else LoRARequest(n, i + 1, str(dirs[n]))
                for i, n in enumerate(names)]
    prompts = _prompts(hf.config.vocab_size, len(names))
    outs = llm.generate(prompts, GREEDY, lora_request=requests)
    refs = {n: hf if n is None else peft_model(hf, dirs[n]) for n in set(names)}
    differs = 0
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        want = hf_greedy(refs[name], prompt, GREEDY.max_tokens)
        assert out.outputs[0].token_ids == want, name
        differs += name is not None and want != hf_greedy(hf, prompt, GREEDY.max_tokens)
    assert differs >= 4  # the adapters change the output: the test can tell them apart
    if mode == "spec":
        stats = llm.stats()
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], stats
    assert_no_leaks(llm.engine)
    assert llm.engine.loras.in_use == {}


def test_builtin_model_with_an_adapter(tmp_path):
    """The built-in model (fp32 here, as the reference runs) with a PEFT adapter."""
    from transformers import AutoModelForCausalLM

    base = resolve_model_path(None)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    make_adapter(hf, tmp_path / "a", 8, 16, ["q_proj", "v_proj", "down_proj"], False, seed=3)
    llm = LLM(enable_lora=True, dtype="float32", lora_modules={"a": str(tmp_path / "a")})
    prompt = llm.tokenizer("The list type")["input_ids"]
    mixed = llm.generate([prompt, prompt], [GREEDY.model_copy(update={"lora_name": "a"}),
                                            GREEDY])
    assert mixed[0].outputs[0].token_ids == hf_greedy(peft_model(hf, tmp_path / "a"), prompt, 12)
    assert mixed[1].outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    assert_no_leaks(llm.engine)


def test_prefix_cache_is_keyed_by_adapter(random_llama):
    """A prompt computed with adapter A is a hit for A again, never for B or the base; the
    outputs stay PEFT's."""
    path, hf, dirs = random_llama
    llm = LLM(path, enable_lora=True, max_loras=2, block_size=8)
    prompt = _prompts(hf.config.vocab_size, 1, seed=5)[0] + [7] * 20  # >= 4 full blocks
    a, b = LoRARequest("all", 1, str(dirs["all"])), LoRARequest("mlp", 2, str(dirs["mlp"]))

    def run(lora):
        before = llm.stats()["prefix_cache_hits"]
        (out,) = llm.generate([prompt], GREEDY, lora_request=lora)
        return out.outputs[0].token_ids, llm.stats()["prefix_cache_hits"] - before

    first, hits = run(a)
    assert hits == 0
    again, hits = run(a)
    assert again == first and hits > 0
    for lora, ref in ((b, peft_model(hf, dirs["mlp"])), (None, hf)):
        tokens, hits = run(lora)
        assert hits == 0 and tokens == hf_greedy(ref, prompt, GREEDY.max_tokens)
    assert first == hf_greedy(peft_model(hf, dirs["all"]), prompt, GREEDY.max_tokens)


def test_cpu_lru_reloads_and_slots_cycle(random_llama):
    """More adapters than kept loaded (max_cpu_loras) and than slots (max_loras): evicted
    ones load again on demand, outputs unchanged, nothing pinned afterwards."""
    path, hf, dirs = random_llama
    llm = LLM(path, enable_lora=True, max_loras=1, max_cpu_loras=1,
              lora_modules={n: str(d) for n, d in dirs.items()})
    prompt = _prompts(hf.config.vocab_size, 1, seed=9)[0]
    first = {}
    for round_ in range(2):
        for name in dirs:
            (out,) = llm.generate([prompt], GREEDY.model_copy(update={"lora_name": name}))
            first.setdefault(name, out.outputs[0].token_ids)
            assert out.outputs[0].token_ids == first[name], (round_, name)
    assert len(llm.engine.loras.loaded) == 1 and llm.engine.loras.num_loads >= 6
    assert first["mlp"] == hf_greedy(peft_model(hf, dirs["mlp"]), prompt, GREEDY.max_tokens)


def _corrupt(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    edit(dst)
    return dst


def test_bad_adapters_are_refused_naming_the_file(random_llama, make_checkpoint, tmp_path):
    path, hf, dirs = random_llama
    llm = LLM(path, enable_lora=True, max_lora_rank=8)
    good = dirs["all"]

    def cfg_edit(**changes):
        def edit(d: Path):
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        return edit

    other, other_hf = make_checkpoint("llama", seed=1, hidden_size=32, intermediate_size=64)
    cases = {
        "missing": (tmp_path / "nope", "is not a directory"),
        "no-weights": (_corrupt(good, tmp_path / "nw", lambda d: (
            d / "adapter_model.safetensors").unlink()), "adapter_model.safetensors is missing"),
        "bad-json": (_corrupt(good, tmp_path / "bj", lambda d: (
            d / "adapter_config.json").write_text("{")), "adapter_config.json is not valid"),
        "rank": (dirs["mlp"], "r: rank 16 exceeds max_lora_rank=8"),
        "dora": (_corrupt(good, tmp_path / "do", cfg_edit(use_dora=True)), "use_dora"),
        "other-base": (make_adapter(other_hf, tmp_path / "ob", 4, 8, ["q_proj"], False, 0),
                       "an adapter of another base model?"),
    }
    for case, (adapter_dir, message) in cases.items():
        with pytest.raises(ValueError, match="lora") as e:
            llm.generate(["x"], GREEDY, lora_request=LoRARequest(case, 1, str(adapter_dir)))
        assert message in str(e.value), (case, str(e.value))
    with pytest.raises(ValueError, match="lora_name: unknown adapter 'nobody'"):
        llm.generate([[5, 6]], GREEDY.model_copy(update={"lora_name": "nobody"}))
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(path).generate([[5, 6]], GREEDY, lora_request=LoRARequest("all", 1, str(good)))
    # the engine serves on, nothing held
    (out,) = llm.generate([[5, 6, 7]], GREEDY, lora_request=LoRARequest("all", 1, str(good)))
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert_no_leaks(llm.engine)
    assert llm.engine.loras.in_use == {}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter on CPU")
def test_triton_lora_path_equals_peft(random_llama):
    """The backend picks the LoRA path with attention: Triton's BGMV kernels here."""
    path, hf, dirs = random_llama
    llm = LLM(path, attention_backend="triton", enable_lora=True, max_loras=2)
    names = [None, "all", "attn", "all"]
    prompts = _prompts(hf.config.vocab_size, len(names), seed=2)
    params = GREEDY.model_copy(update={"max_tokens": 4})
    outs = llm.generate(prompts, params, lora_request=[
        None if n is None else LoRARequest(n, 1, str(dirs[n])) for n in names])
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        ref = hf if name is None else peft_model(hf, dirs[name])
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, 4), name
    assert_no_leaks(llm.engine)
