"""AsyncEngine: streaming, concurrent requests, abort, and a consumer that walks away."""

from __future__ import annotations

import asyncio

import pytest
from conftest import assert_no_leaks

from raysvc import LLM, AsyncEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("llama")[0]


def test_streams_match_offline_generate(path):
    prompts = [[5, 6, 7], list(range(3, 40)), [9] * 17]
    expected = [o.outputs[0].token_ids for o in LLM(path).generate(prompts, GREEDY)]

    async def main():
        engine = AsyncEngine(path, max_num_batched_tokens=16)

        async def consume(i, prompt):
            seen = []
            async for out in await engine.add_request(f"r{i}", prompt, GREEDY):
                tokens = out.outputs[0].token_ids
                assert tokens[: len(seen)] == seen  # cumulative, growing
                seen = tokens
            assert out.finished and out.outputs[0].finish_reason == "length"
            return seen

        results = await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))
        stats = await engine.stats()
        await engine.shutdown()
        return results, stats, engine

    results, stats, engine = asyncio.run(main())
    assert results == expected
    assert_no_leaks(engine.engine)


def test_abort_and_early_exit_free_blocks(path):
    async def main():
        engine = AsyncEngine(path)
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        stream = await engine.add_request("aborted", list(range(3, 30)), long)
        outs = []

        async def consume():
            async for out in stream:
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await engine.abort("aborted")
        await asyncio.wait_for(task, 30)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"

        # a consumer that stops reading (client disconnect) aborts its request
        stream2 = await engine.add_request("walks-away", list(range(3, 30)), long)
        async for _ in stream2:
            break
        await stream2.aclose()
        for _ in range(100):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)

        with pytest.raises(ValueError, match="prompt: token id"):
            await engine.add_request("bad", [10**7], GREEDY)
        ok = [o async for o in engine.generate([5, 6, 7], GREEDY)]
        await engine.shutdown()
        return engine, ok

    engine, ok = asyncio.run(main())
    assert ok[-1].finished
    assert_no_leaks(engine.engine)


def test_a_failing_request_raises_on_its_own_stream_only(path):
    """A request that raises inside a step ends its own stream with RequestFailedError; the
    engine stays healthy and the other stream finishes as if alone."""
    from raysvc.engine.async_engine import RequestFailedError

    expected = LLM(path).generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids

    async def main():
        engine = AsyncEngine(path)
        good = await engine.add_request("good", [5, 6, 7], GREEDY)
        bad = await engine.add_request("bad", [8, 9], SamplingParams(min_tokens=2,
                                                                      max_tokens=4))
        engine.engine.requests["bad"].stop_token_ids = {10**6}  # the sampler raises on it

        async def last(stream):
            return [out async for out in stream][-1]

        got, failed = await asyncio.gather(last(good), last(bad), return_exceptions=True)
        await engine.shutdown()
        return got, failed, engine

    got, failed, engine = asyncio.run(main())
    assert isinstance(failed, RequestFailedError) and "IndexError" in str(failed)
    assert got.outputs[0].token_ids == expected
    assert engine.failure is None
    assert_no_leaks(engine.engine)


def test_a_grammar_that_compiles_too_long_is_refused_off_the_step_thread(path):
    """Compilation is bounded (grammar_compile_timeout_s) and runs on its own thread: the
    request is refused with a ValueError naming the field while another stream goes on."""
    from raysvc.engine.structured_output import GrammarCompiler

    compile_once = GrammarCompiler.compile

    def slow_compile(self, params):
        import time

        time.sleep(1.0)  # a pathological grammar
        return compile_once(self, params)

    async def main():
        engine = AsyncEngine(path, grammar_compile_timeout_s=0.2)
        other = await engine.add_request("other", [5, 6, 7], GREEDY)
        GrammarCompiler.compile = slow_compile
        try:
            with pytest.raises(ValueError, match="structured_outputs.regex: compiling it "
                                                 "took longer than 0.2s"):
                await engine.add_request("slow", [8, 9], SamplingParams(
                    max_tokens=4, structured_outputs={"regex": "[a-z]+"}))
        finally:
            GrammarCompiler.compile = compile_once
        outs = [out async for out in other]
        await engine.shutdown()
        return outs, engine

    outs, engine = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12
    assert "slow" not in engine.engine.requests
    assert_no_leaks(engine.engine)
