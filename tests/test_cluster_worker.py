"""`LLMWorker` driven directly (no Ray): channels carry every request's tokens exactly once,
in order, equal to the offline engine's; abort and a closed channel free all blocks."""

from __future__ import annotations

import asyncio

import pytest

from raysvc import LLM, SamplingParams
from raysvc.cluster.worker import LLMWorker

PROMPTS = [[5, 6, 7], list(range(3, 40)), [9] * 17, [11, 12]]
PARAMS = {"temperature": 0.0, "max_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("llama")[0]


def _worker(path, **kw) -> LLMWorker:
    return LLMWorker("w", {"model": path, "num_kv_blocks": 64,
                           "max_num_batched_tokens": 16}, **kw)


async def _consume(worker, channel, want: set[str], stop_after: int | None = None):
    """Collect per-request tokens from `channel` until every wanted request finished."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    finished: set[str] = set()
    batches = 0
    gen = worker.open_channel(channel)
    try:
        async for batch in gen:
            batches += 1
            for rid, chunk in batch:
                for d in chunk.deltas:
                    tokens.setdefault(rid, []).extend(d.token_ids)
                    reasons[rid] = d.finish_reason
                if chunk.finished:
                    finished.add(rid)
            if finished >= want or (stop_after is not None and batches >= stop_after):
                break
    finally:
        await gen.aclose()
    return tokens, batches, reasons


@pytest.mark.parametrize("interval", [0.0, 0.05])
def test_channel_streams_equal_offline_engine(path, interval):
    expected = [o.outputs[0].token_ids for o in LLM(path).generate(
        PROMPTS, SamplingParams(**PARAMS))]

    async def main():
        worker = _worker(path, stream_interval_s=interval)
        consumer = asyncio.create_task(_consume(worker, "c", {f"r{i}" for i in range(4)}))
        await asyncio.sleep(0)
        for i, prompt in enumerate(PROMPTS):
            await worker.submit("c", f"r{i}", prompt, PARAMS)
        tokens, batches, _ = await asyncio.wait_for(consumer, 60)
        load = await worker.load()
        return tokens, batches, load

    tokens, batches, load = asyncio.run(main())
    assert [tokens[f"r{i}"] for i in range(4)] == expected
    assert batches < sum(len(e) for e in expected)  # one item per step, not per token
    assert load.kv_blocks_free == load.kv_blocks_total and load.requests_in_flight == 0


def test_abort_and_closed_channel_free_blocks(path):
    long = {"temperature": 0.0, "max_tokens": 900, "ignore_eos": True}

    async def main():
        worker = _worker(path)
        with pytest.raises(ValueError, match="max_tokens"):
            await worker.submit("c", "bad", [5, 6], {"max_tokens": 0})
        consumer = asyncio.create_task(_consume(worker, "c", {"a"}))
        await asyncio.sleep(0)
        await worker.submit("c", "a", [5, 6, 7], long)
        await worker.submit("c", "b", [8, 9], long)
        await asyncio.sleep(0.05)
        await worker.abort("a")
        tokens, _, reasons = await asyncio.wait_for(consumer, 60)  # a ends, aborted;
        assert reasons["a"] == "abort" and len(tokens.get("a", [])) < 900
        # ... and closing the channel (the consumer left) aborts b
        for _ in range(100):
            load = await worker.load()
            if load.kv_blocks_free == load.kv_blocks_total and load.running == 0:
                break
            await asyncio.sleep(0.05)
        await worker.engine.shutdown()
        return load

    load = asyncio.run(main())
    assert load.kv_blocks_free == load.kv_blocks_total
    assert load.running == 0 and load.requests_in_flight == 0
    assert load.num_generated_tokens < 900  # b was stopped too, long before its end


def test_an_engine_stuck_in_one_step_fails_the_health_check(path):
    """A step that never returns (a hung device) cannot report itself: the worker's health
    check sees how long the step has run and fails past stuck_timeout_s, so the router
    drops the worker; a request that fails alone leaves the worker healthy."""
    import threading

    async def main():
        worker = _worker(path, stuck_timeout_s=0.3)
        llm = worker.engine.engine
        release = threading.Event()
        step = llm.step

        def hung_step():
            release.wait(10)
            return step()

        llm.step = hung_step
        assert await worker.health()
        await worker.submit("c", "r", [5, 6, 7], dict(PARAMS))
        await asyncio.sleep(0.6)
        with pytest.raises(RuntimeError, match="engine stuck: one step has run"):
            await worker.health()
        assert not (await worker.load()).healthy
        release.set()
        llm.step = step
        await asyncio.sleep(0.2)
        assert await worker.health()  # the step ended: no longer stuck
        await worker.engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_prefix_blocks_move_between_workers_and_show_in_kv_events(path):
    """[kv-fabric] step 1 at the worker: B takes A's prefix blocks; B's KV events (what the
    router's index mirrors) then list them, and B's next request of that prompt hits them."""
    from raysvc.block_hash import hash_blocks

    prompt = list(range(3, 60))

    async def main():
        a, b = _worker(path), _worker(path)
        consumer = asyncio.create_task(_consume(a, "c", {"r"}))
        await asyncio.sleep(0)
        await a.submit("c", "r", prompt, PARAMS)
        await consumer
        hashes = hash_blocks(prompt[:-1], a.info().block_size)
        kv = await a.export_kv(hashes)
        assert kv.block_hashes == hashes
        first = await b.kv_events("", 0, wait_s=0)  # a snapshot: empty
        assert first.snapshot == set()
        assert await b.import_kv(kv) == len(hashes)
        news = await b.kv_events(first.epoch, first.step, wait_s=1.0)
        stored = [h for _, events in news.batches for kind, hs in events if kind == "stored"
                  for h in hs]
        assert stored == hashes
        consumer = asyncio.create_task(_consume(b, "c", {"r2"}))
        await asyncio.sleep(0)
        await b.submit("c", "r2", prompt, PARAMS)
        tokens, _, _ = await consumer
        load = await b.load()
        assert load.prefix_cache_hits == len(hashes) * a.info().block_size
        return tokens["r2"]

    got = asyncio.run(main())
    assert got == LLM(path).generate([prompt], SamplingParams(**PARAMS))[0].outputs[0].token_ids


def test_a_pull_from_a_source_that_dies_mid_transfer_falls_back_to_recompute(path):
    """[kv-fabric]: the source worker dies while B waits for its blocks: B computes the
    prefix itself, the output is the offline engine's, nothing is half-imported."""
    from ray.exceptions import ActorDiedError

    from raysvc.block_hash import hash_blocks

    prompt = list(range(3, 60))

    class DyingSource:
        class export_kv:  # noqa: N801 - Ray's method shape: handle.export_kv.remote(...)
            @staticmethod
            def remote(hashes):
                async def die():
                    await asyncio.sleep(0.05)
                    raise ActorDiedError()
                return asyncio.ensure_future(die())

    async def main():
        b = _worker(path)
        consumer = asyncio.create_task(_consume(b, "c", {"r"}))
        await asyncio.sleep(0)
        hashes = hash_blocks(prompt[:-1], b.info().block_size)
        await b.submit("c", "r", prompt, PARAMS, 0, (DyingSource(), hashes))
        tokens, _, _ = await consumer
        load = await b.load()
        assert load.kv_pull_failures == 1 and load.kv_pull_blocks == 0
        assert load.prefix_cache_hits == 0 and load.kv_blocks_free == load.kv_blocks_total
        return tokens["r"]

    got = asyncio.run(main())
    assert got == LLM(path).generate([prompt], SamplingParams(**PARAMS))[0].outputs[0].token_ids
