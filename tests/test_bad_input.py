"""Bad input at the Python API: a ValueError naming the field, and no harm to anyone else."""

from __future__ import annotations

import json

import pytest
from conftest import assert_no_leaks

from raysvc import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llama")[0], max_model_len=128)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"bogus": 1}, "bogus"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    # values the sampler cannot compute with (held-out review, 2026-12-04)
    ({"top_k": 2 ** 63}, "top_k"),
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
    ({"top_p": float("nan")}, "top_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"n": 129}, "n"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, field", [
    ([], "prompt"),
    ("", "prompt"),
    ([1, 2, 10**6], "prompt: token id 1000000"),
    ([1, -1], "prompt: token id -1"),
    (list(range(3, 131)), "max_model_len"),
    ([1.5, 2], "prompt"),
    (None, "prompt"),
])
def test_bad_prompts_rejected_without_leaks(llm, prompt, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt] if prompt is not None else [None], SamplingParams(max_tokens=4))
    assert_no_leaks(llm.engine)
    assert not llm.engine.requests


def test_extreme_but_valid_params_sample(llm):
    """The edges of each range run: the largest seed with n = 2 (its second sample's seed
    wraps), a top_k beyond the vocabulary, a tiny temperature (raised to 0.01)."""
    params = SamplingParams(n=2, seed=2 ** 64 - 1, top_k=2 ** 31 - 1, temperature=1e-30,
                            repetition_penalty=100.0, max_tokens=4, ignore_eos=True)
    assert params.temperature == 0.01
    out = llm.generate([[5, 6, 7]], params)[0]
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]
    assert_no_leaks(llm.engine)


def test_stop_token_ids_outside_the_vocabulary(llm):
    with pytest.raises(ValueError, match="stop_token_ids: token id 1000000"):
        llm.engine.add_request("x", [5, 6], SamplingParams(stop_token_ids=[10**6],
                                                           min_tokens=2, max_tokens=4))
    assert not llm.engine.requests
    assert_no_leaks(llm.engine)


def test_a_request_that_raises_in_the_step_fails_alone(llm):
    """An exception while sampling one request (its stop ids slipped past validation, as
    they did before add_request checked them) ends that request with an error; the engine
    and the other requests go on, with the output they would have had alone."""
    engine = llm.engine
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([[5, 6, 7, 8], [9, 10, 11]], good)
    engine.add_request("good-1", [5, 6, 7, 8], good)
    engine.add_request("bad", [5, 6], SamplingParams(min_tokens=2, max_tokens=4,
                                                     stop_token_ids=[3]))
    engine.add_request("good-2", [9, 10, 11], good)
    engine.requests["bad"].stop_token_ids = {10**6}  # an index the sampler will raise on
    failed_before = engine.stats()["num_failed_requests"]
    done, errors = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out
            elif out.finished:
                done[out.request_id] = out
    assert set(errors) == {"bad"} and "IndexError" in errors["bad"].error
    assert errors["bad"].finished and errors["bad"].outputs[0].finish_reason == "abort"
    assert done["good-1"].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert done["good-2"].outputs[0].token_ids == expected[1].outputs[0].token_ids
    assert engine.stats()["num_failed_requests"] == failed_before + 1
    assert_no_leaks(engine)


def test_bad_request_does_not_disturb_batch(llm):
    engine = llm.engine
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([[5, 6, 7, 8]], good)[0].outputs[0].token_ids
    engine.add_request("good", [5, 6, 7, 8], good)
    engine.step()  # in flight
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("bad", [10**7], good)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("good", [1, 2], good)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final.request_id == "good" and final.outputs[0].token_ids == expected
    assert_no_leaks(engine)


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"a{i}", list(range(3, 40 + i)), params)
    engine.add_request("n", list(range(3, 20)), params.model_copy(update={"n": 3}))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_free"] < engine.stats()["kv_blocks_total"]
    out = engine.abort("a1")
    assert out.outputs[0].finish_reason == "abort"
    assert engine.abort("missing") is None
    engine.abort("n")
    engine.step()
    engine.abort("a0")  # waiting or running, it does not matter
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 12}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"attention_backend": "flash"}, "attention_backend"),
    ({"dtype": "int8"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"num_kv_blocks": -3}, "num_kv_blocks"),
    ({"max_model_len": 10**6}, "max_model_len"),
    ({"not_a_flag": True}, "not_a_flag"),
    ({"enable_prefix_caching": "no"}, "enable_prefix_caching"),
    ({"enforce_eager": 1}, "enforce_eager"),
    ({"skip_tokenizer_init": "yes"}, "skip_tokenizer_init"),
])
def test_bad_engine_arguments(make_checkpoint, kwargs, field):
    with pytest.raises(ValueError, match=field):
        LLM(make_checkpoint("llama")[0], **kwargs)


def test_bad_checkpoints(tmp_path, make_checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    # a checkpoint whose tensors do not fit its config
    import shutil

    src = make_checkpoint("llama")[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight.*shape"):
        LLM(str(bad))


def test_finish_one_sample_from_outside(llm):
    """An ingress that finds a stop string ends that sample only; its blocks are freed."""
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    engine.add_request("multi", list(range(3, 30)), params)
    for _ in range(3):
        engine.step()
    out = engine.finish_sample("multi", 1, "stop", "</end>")
    assert out is not None and not out.finished
    assert out.outputs[1].finish_reason == "stop" and out.outputs[1].stop_reason == "</end>"
    assert engine.finish_sample("multi", 1) is None  # already finished
    assert engine.finish_sample("missing", 0) is None
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o
    assert final.finished
    assert len(final.outputs[1].token_ids) < 30 == len(final.outputs[0].token_ids)
    assert_no_leaks(engine)
