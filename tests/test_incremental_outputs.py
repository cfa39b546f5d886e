"""[hot-path] Incremental outputs: with `output_kind="delta"` each step hands out only what
is new, so a stream costs O(its length): the deltas concatenate to exactly what
`LLM.generate` returns (tokens, text under stop strings, logprobs, n > 1 samples, prompt
logprobs once and complete), and the elements handed out over a whole stream equal its
length (a cumulative stream hands out about length^2 / 2)."""

from __future__ import annotations

import asyncio

import pytest

from raysvc import LLM, SamplingParams
from raysvc.engine.async_engine import AsyncEngine
from raysvc.engine.outputs import merge_outputs

PROMPTS = ["The list type", "A dictionary maps", "def f(x):"]


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=256, dtype="float32")


def _stream(params: SamplingParams, prompt: str):
    async def main():
        engine = AsyncEngine(num_kv_blocks=256, dtype="float32")
        try:
            return [o async for o in await engine.add_request("r", prompt, params)]
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.mark.parametrize("kw", [
    dict(max_tokens=40, temperature=0, ignore_eos=True),
    dict(max_tokens=40, temperature=0, stop=["ing", "the t"], ignore_eos=True),
    dict(max_tokens=24, temperature=0.8, seed=3, n=3, logprobs=2, ignore_eos=True),
    dict(max_tokens=12, temperature=0, prompt_logprobs=3),
])
def test_deltas_concatenate_to_generate(llm, kw):
    expected = llm.generate([PROMPTS[0]], SamplingParams(**kw))[0]
    outs = _stream(SamplingParams(**kw, output_kind="delta"), PROMPTS[0])
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    merged = outs[0]
    for o in outs[1:]:
        merged = merge_outputs(merged, o)
    for got, want in zip(merged.outputs, expected.outputs, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
        if want.logprobs is not None:
            assert [list(x) for x in got.logprobs] == [list(x) for x in want.logprobs]
    with_prompt = [o for o in outs if o.prompt_logprobs is not None]
    if kw.get("prompt_logprobs"):
        (only,) = with_prompt  # once, and complete
        assert len(only.prompt_logprobs) == len(expected.prompt_token_ids)
        assert [None if e is None else sorted(e) for e in only.prompt_logprobs] == [
            None if e is None else sorted(e) for e in expected.prompt_logprobs]
    else:
        assert not with_prompt


def test_a_delta_stream_hands_out_each_token_once():
    n = 120
    params = dict(max_tokens=n, temperature=0, ignore_eos=True)
    delta = _stream(SamplingParams(**params, output_kind="delta"), PROMPTS[1])
    cumulative = _stream(SamplingParams(**params), PROMPTS[1])
    assert sum(len(o.outputs[0].token_ids) for o in delta) == n  # O(length)
    handed = sum(len(o.outputs[0].token_ids) for o in cumulative)
    assert handed >= n * (n + 1) // 2 * 0.9  # the cumulative stream's O(length^2)
    assert sum(len(o.outputs[0].text) for o in delta) == len(cumulative[-1].outputs[0].text)


def test_final_only_hands_out_one_output():
    outs = _stream(SamplingParams(max_tokens=10, temperature=0, output_kind="final_only"),
                   PROMPTS[2])
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 10


def test_output_kind_is_checked():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="partial")
