"""[kv-fabric] step 4, the engine and the worker: a running sequence leaves one engine with
its KV (`migrate_out`) and continues on another (`add_request(resume_kv=)`) without
recomputing anything.

References: HF transformers' greedy continuation of the original prompt (the migrated
run's tokens, before and after the move, must be exactly those), the source engine's own
KV bytes (the target's blocks hold the same bits), and the engines' computed-token
counters (the target computes only the tokens the undisturbed run had left to compute).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import assert_no_leaks, hf_greedy

from raysvc import LLM, SamplingParams

BLOCK = 8
TOTAL = 12  # tokens generated in all, before and after the move


def _prompt(n: int = 45, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _run_until(engine, request_id: str, steps: int | None = None,
               outputs: int | None = None) -> list[int]:
    """Step `engine` a number of times, or until the request generated `outputs` tokens;
    the request's output tokens so far."""
    seq = engine.requests[request_id].seqs[0]
    done = 0
    while (steps is not None and done < steps) or (outputs is not None and
                                                   seq.num_output_tokens < outputs):
        engine.step()
        done += 1
    return list(seq.output_token_ids)


def _finish(engine, request_id: str) -> list[int]:
    """Step `engine` until it is idle; the request's output tokens."""
    seq = engine.requests[request_id].seqs[0]
    while engine.has_unfinished_requests():
        engine.step()
    return list(seq.output_token_ids)


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama")


# 45-token prompt, 8-token blocks: after 6 outputs 50 tokens are computed (6 full blocks
# and 2 tokens of a seventh); after 4, exactly 48 (6 full blocks); after one 16-token
# prefill chunk, 16 tokens and no output yet
@pytest.mark.parametrize("moved_after", ["partial block", "full blocks", "mid-prefill"])
def test_a_migrated_sequence_continues_without_recompute(model, moved_after):
    path, hf = model
    prompt = _prompt()
    budget = 16 if moved_after == "mid-prefill" else 512
    source = LLM(path, block_size=BLOCK, max_num_batched_tokens=budget)
    target = LLM(path, block_size=BLOCK)
    source.engine.add_request("r", prompt, _params(TOTAL))
    if moved_after == "mid-prefill":
        before = _run_until(source.engine, "r", steps=1)
    else:
        before = _run_until(source.engine, "r", outputs=6 if moved_after == "partial block" else 4)
    computed = source.engine.requests["r"].seqs[0].num_computed_tokens
    moved, nothing = source.engine.migrate_out(["r"])
    kv = moved["r"]
    expected = len(prompt) + len(before) - 1 if before else 16
    assert nothing == [] and kv.num_tokens == computed == expected
    assert source.stats()["num_migrated_out"] == 1
    assert_no_leaks(source.engine)  # gone from the source, its blocks free

    continued = prompt + before
    target.engine.add_request("r", continued, _params(TOTAL - len(before)), resume_kv=kv)
    target.engine.step()  # admitted: the carried bytes are in its blocks
    seq = target.engine.requests["r"].seqs[0]
    blocks = seq.block_table[: -(-computed // BLOCK)]
    data = target.engine.runner.kv_cache.data[:, :, blocks]
    sent = torch.from_numpy(kv.data).view(data.dtype).view(data.shape)
    within = torch.arange(len(blocks) * BLOCK) < computed  # the last block's filled slots
    assert torch.equal(data.flatten(2, 3)[:, :, within], sent.flatten(2, 3)[:, :, within])
    after = _finish(target.engine, "r")

    assert before + after == hf_greedy(hf, prompt, TOTAL)
    stats = target.stats()
    assert stats["kv_tokens_carried"] == computed
    # exactly what the undisturbed run had left: the rest of the prompt (if any), then one
    # token per output but the last
    left = len(continued) - computed + (TOTAL - len(before)) - 1
    assert stats["num_computed_tokens"] == left
    assert_no_leaks(target.engine)


def test_a_migrated_sequence_speculates_on_the_target(model):
    """The target speculates (a draft model of its own, which has no KV for the sequence
    yet: it catches up by itself); the verified output is still HF's greedy run."""
    path, hf = model
    prompt = _prompt(seed=5)
    source = LLM(path, block_size=BLOCK)
    target = LLM(path, block_size=BLOCK, speculative_config={
        "method": "draft_model", "model": path, "num_speculative_tokens": 3})
    source.engine.add_request("r", prompt, _params(TOTAL))
    before = _run_until(source.engine, "r", outputs=5)
    kv = source.engine.migrate_out(["r"])[0]["r"]
    target.engine.add_request("r", prompt + before, _params(TOTAL - 5), resume_kv=kv)
    assert before + _finish(target.engine, "r") == hf_greedy(hf, prompt, TOTAL)
    stats = target.stats()
    assert stats["kv_tokens_carried"] == kv.num_tokens and stats["spec_accepted_tokens"] > 0
    assert_no_leaks(target.engine)


def test_a_cached_prefix_on_the_target_is_used_and_the_rest_carried(model):
    path, hf = model
    prompt = _prompt(seed=1)
    source, target = LLM(path, block_size=BLOCK), LLM(path, block_size=BLOCK)
    target.generate([prompt[:33]], _params(1))  # 4 full blocks of the prompt, cached there
    source.engine.add_request("r", prompt, _params(TOTAL))
    before = _run_until(source.engine, "r", outputs=3)
    kv = source.engine.migrate_out(["r"])[0]["r"]
    target.engine.add_request("r", prompt + before, _params(TOTAL - 3), resume_kv=kv)
    after = _finish(target.engine, "r")
    assert before + after == hf_greedy(hf, prompt, TOTAL)
    stats = target.stats()
    assert stats["prefix_cache_hits"] == 4 * BLOCK  # taken from its own cache ...
    assert stats["kv_tokens_carried"] == kv.num_tokens - 4 * BLOCK  # ... the rest carried
    assert_no_leaks(target.engine)


def test_a_continuation_that_differs_uses_only_the_common_tokens(model):
    """The KV covers more tokens than the continuation has (its client saw fewer), or
    another token: only the common run is carried, the rest computed; output still HF's."""
    path, hf = model
    prompt = _prompt(seed=2)
    source, target = LLM(path, block_size=BLOCK), LLM(path, block_size=BLOCK)
    source.engine.add_request("r", prompt, _params(TOTAL))
    before = _run_until(source.engine, "r", outputs=8)
    kv = source.engine.migrate_out(["r"])[0]["r"]
    seen = before[:5]  # the last 3 tokens never reached the client
    target.engine.add_request("a", prompt + seen, _params(TOTAL - 5), resume_kv=kv)
    assert seen + _finish(target.engine, "a") == hf_greedy(hf, prompt, TOTAL)
    assert target.stats()["kv_tokens_carried"] == len(prompt) + 5 - 1

    other = list(prompt)
    other[20] = (other[20] + 1) % 500 + 3  # differs from token 20 on
    target.engine.add_request("b", other, _params(4), resume_kv=kv)
    assert _finish(target.engine, "b") == hf_greedy(hf, other, 4)
    # tokens 0-15 (two blocks) are in its cache since "a": only 16-19 are carried
    assert target.stats()["kv_tokens_carried"] == len(prompt) + 5 - 1 + 4
    assert_no_leaks(target.engine)


def test_prompt_logprobs_compute_every_prompt_position(model):
    """A request moved mid-prefill that asks for prompt logprobs computes its prompt
    again (each position's logprobs need its logits): nothing is carried."""
    path, _ = model
    prompt = _prompt(seed=6)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    source = LLM(path, block_size=BLOCK, max_num_batched_tokens=16)
    source.engine.add_request("r", prompt, params)
    _run_until(source.engine, "r", steps=1)
    kv = source.engine.migrate_out(["r"])[0]["r"]
    target = LLM(path, block_size=BLOCK)
    target.engine.add_request("r", prompt, params, resume_kv=kv)
    outs = []
    while target.engine.has_unfinished_requests():
        outs += target.engine.step()
    (want,) = LLM(path, block_size=BLOCK).generate([prompt], params)
    assert outs[-1].prompt_logprobs == want.prompt_logprobs
    assert target.stats()["kv_tokens_carried"] == 0


def test_kv_of_another_model_or_block_size_is_refused_naming_it(model, make_checkpoint):
    path, _ = model
    other, _ = make_checkpoint("llama", seed=1, hidden_size=32, intermediate_size=64)
    source = LLM(path, block_size=BLOCK)
    source.engine.add_request("r", _prompt(), _params(TOTAL))
    before = _run_until(source.engine, "r", outputs=2)
    kv = source.engine.migrate_out(["r"])[0]["r"]
    for kwargs, field in ((dict(model=path, block_size=16), "block_size"),
                          (dict(model=other, block_size=BLOCK), "model")):
        target = LLM(**kwargs)
        with pytest.raises(ValueError, match=f"resume_kv: .*{field} is"):
            target.engine.add_request("r", _prompt() + before, _params(4), resume_kv=kv)
        assert_no_leaks(target.engine)
        assert not target.engine.requests  # refused: no trace


def test_only_single_sample_requests_with_kv_move(model):
    """n > 1 stays (its samples share blocks; it finishes where it is); a request that has
    computed nothing is named as such (handed over plainly: there is nothing to move)."""
    path, _ = model
    source = LLM(path, block_size=BLOCK, max_num_seqs=2)
    engine = source.engine
    engine.add_request("many", _prompt(), SamplingParams(n=2, max_tokens=8, ignore_eos=True))
    engine.add_request("one", _prompt(seed=3), _params(8))
    engine.step()
    engine.add_request("later", _prompt(seed=4), _params(8))  # no seat: waits, computes nothing
    engine.step()
    moved, nothing = engine.migrate_out(["many", "one", "later", "unknown"])
    assert list(moved) == ["one"] and nothing == ["later"]
    assert set(engine.requests) == {"many", "later"}
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


def test_a_worker_migrates_its_streams_and_another_resumes_them(model):
    """`LLMWorker.migrate` at the worker: each stream gets every token made there, then a
    migrated hand-over mark; the next worker takes the KV and the stream goes on, token-
    identical to HF's, with nothing recomputed; neither worker holds anything after."""
    from test_cluster_worker import _consume

    from raysvc.cluster.worker import LLMWorker

    path, hf = model
    prompts = {f"r{i}": _prompt(30 + 7 * i, seed=10 + i) for i in range(3)}

    def worker():
        return LLMWorker("w", {"model": path, "num_kv_blocks": 64, "block_size": BLOCK})

    class Handle:  # Ray's shape: handle.take_migrated.remote(...) is awaitable
        def __init__(self, w):
            self.take_migrated = self
            self.w = w

        def remote(self, request_id):
            async def take():
                return self.w.take_migrated(request_id)
            return asyncio.ensure_future(take())

    async def main():
        a, b = worker(), worker()
        params = {"temperature": 0.0, "max_tokens": TOTAL, "ignore_eos": True}
        chunks: dict[str, list] = {rid: [] for rid in prompts}

        async def read(w, want):
            gen = w.open_channel("c")
            async for batch in gen:
                for rid, chunk in batch:
                    chunks[rid].append(chunk)
                    if chunk.finished:
                        want.discard(rid)
                if not want:
                    break
            await gen.aclose()

        reader = asyncio.create_task(read(a, set(prompts)))
        await asyncio.sleep(0)
        for rid, prompt in prompts.items():
            await a.submit("c", rid, prompt, params)
        while sum(bool(c) for c in chunks.values()) < len(prompts):
            await asyncio.sleep(0.01)  # every stream has started
        assert await a.migrate() == (len(prompts), 0)
        await reader
        assert a.migrations_held() == len(prompts)
        before = {}
        for rid, cs in chunks.items():
            assert cs[-1].handed_over and cs[-1].migrated and not cs[-1].deltas
            before[rid] = [t for c in cs for d in c.deltas for t in d.token_ids]
        load = await a.load()
        assert load.kv_migrations_out == len(prompts) and load.requests_in_flight == 0

        reader = asyncio.create_task(_consume(b, "c", set(prompts)))
        await asyncio.sleep(0)
        for rid, prompt in prompts.items():
            rest = {**params, "max_tokens": TOTAL - len(before[rid])}
            await b.submit("c", rid, prompt + before[rid], rest, 0, None, (Handle(a), rid))
        after, _, _ = await reader
        assert a.migrations_held() == 0
        load_a, load_b = await a.load(), await b.load()
        assert load_b.kv_migrations_in == len(prompts) and load_b.kv_migration_failures == 0
        assert load_b.kv_tokens_carried == sum(len(p) + len(before[r]) - 1
                                               for r, p in prompts.items())
        for load in (load_a, load_b):
            assert load.kv_blocks_free == load.kv_blocks_total and not load.requests_in_flight
        return before, after

    before, after = asyncio.run(asyncio.wait_for(main(), 120))
    for rid, prompt in prompts.items():
        assert before[rid] + after[rid] == hf_greedy(hf, prompt, TOTAL), rid


def test_a_migrated_kv_that_is_gone_is_recomputed(model):
    """The draining worker died (or dropped it) before the KV was taken: the continuation
    computes prompt + output itself; same tokens, the failure counted."""
    from test_cluster_worker import _consume

    from raysvc.cluster.worker import LLMWorker

    path, hf = model
    prompt = _prompt()

    class Gone:
        class take_migrated:  # noqa: N801 - Ray's method shape
            @staticmethod
            def remote(request_id):
                async def dead():
                    from ray.exceptions import ActorDiedError
                    raise ActorDiedError()
                return asyncio.ensure_future(dead())

    async def main():
        b = LLMWorker("w", {"model": path, "num_kv_blocks": 64, "block_size": BLOCK})
        reader = asyncio.create_task(_consume(b, "c", {"r"}))
        await asyncio.sleep(0)
        head = hf_greedy(hf, prompt, 3)
        params = {"temperature": 0.0, "max_tokens": TOTAL - 3, "ignore_eos": True}
        await b.submit("c", "r", prompt + head, params, 0, None, (Gone(), "r"))
        tokens, _, _ = await reader
        load = await b.load()
        assert load.kv_migration_failures == 1 and load.kv_tokens_carried == 0
        assert load.kv_blocks_free == load.kv_blocks_total
        return head + tokens["r"]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == hf_greedy(hf, prompt, TOTAL)
