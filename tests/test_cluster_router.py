"""Router admission control, without Ray: fake worker handles with `.remote()` methods.

The router is a plain class (Ray makes it an actor), so its queue, ledger and placement
are tested directly: FCFS order, the bound (Overloaded), batch slots and KV blocks,
least-loaded placement, release, cancellation, and workers joining and leaving.
"""

from __future__ import annotations

import asyncio

import pytest

from raysvc.cluster.messages import NoWorkers, Overloaded, WorkerInfo, WorkerLoad
from raysvc.cluster.router import Router


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


class FakeWorker:
    def __init__(self, worker_id: str, blocks: int = 100, seqs: int = 2, block_size: int = 16):
        self.info_value = WorkerInfo(worker_id, "node", 1, "cpu", "m", 512, 100, block_size,
                                     blocks, seqs)
        self.dead = False
        self.info = _Method(self._info)
        self.load = _Method(self._load)
        self.health = _Method(self._load)

    async def _info(self):
        return self.info_value

    async def _load(self):
        if self.dead:
            raise RuntimeError("dead")
        return WorkerLoad(kv_blocks_total=self.info_value.kv_blocks_total,
                          kv_blocks_free=self.info_value.kv_blocks_total)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _pending(task: asyncio.Task) -> bool:
    await asyncio.sleep(0.01)
    return not task.done()


def test_fcfs_with_batch_slots_and_release():
    async def main():
        router = Router(max_queue_len=10, health_interval_s=60)
        await router.add_worker("w", FakeWorker("w", seqs=2))
        t1 = await router.acquire("a", 10)
        t2 = await router.acquire("b", 10)
        assert (t1.worker_id, t2.worker_id) == ("w", "w")
        c = asyncio.create_task(router.acquire("c", 10))
        d = asyncio.create_task(router.acquire("d", 10))
        assert await _pending(c) and await _pending(d)
        assert (await router.stats())["queue_len"] == 2
        router.release("b")
        assert (await c).ticket_id == "c" and await _pending(d)  # FCFS: c before d
        router.release("a")
        assert (await d).ticket_id == "d"
        router.release("c")
        router.release("d")
        w = (await router.stats())["workers"][0]
        assert w["requests_admitted"] == 0 and w["requests_routed"] == 4

    run(main())


def test_bounded_queue_refuses_with_overloaded():
    async def main():
        router = Router(max_queue_len=2, health_interval_s=60)
        await router.add_worker("w", FakeWorker("w", seqs=1))
        await router.acquire("run", 1)
        waiting = [asyncio.create_task(router.acquire(f"q{i}", 1)) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await router.acquire("over", 1)
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert (await router.stats())["queue_len"] == 0  # cancelled waiters leave no trace

    run(main())


def test_kv_blocks_gate_admission_and_n_takes_seats():
    async def main():
        router = Router(health_interval_s=60)
        await router.add_worker("w", FakeWorker("w", blocks=10, seqs=8, block_size=16))
        # 64 prompt tokens = 4 blocks + 1 to grow into
        await router.acquire("a", 64)
        waiting = asyncio.create_task(router.acquire("b", 80))  # needs 6 > 5 left
        assert await _pending(waiting)
        router.release("a")
        await waiting
        router.release("b")
        await router.acquire("eight", 1, n=8)  # n samples take n batch slots
        one_more = asyncio.create_task(router.acquire("one", 1))
        assert await _pending(one_more)
        router.release("eight")
        await one_more
        router.release("one")
        # a request larger than the whole worker still runs once the worker is idle
        huge = await router.acquire("huge", 10_000, n=20)
        assert huge.worker_id == "w"

    run(main())


def test_least_loaded_placement_and_spread():
    async def main():
        router = Router(health_interval_s=60)
        for wid in ("w0", "w1"):
            await router.add_worker(wid, FakeWorker(wid, seqs=4))
        tickets = [await router.acquire(f"r{i}", 8) for i in range(4)]
        assert sorted(t.worker_id for t in tickets) == ["w0", "w0", "w1", "w1"]
        for t in tickets:
            if t.worker_id == "w1":
                router.release(t.ticket_id)
        assert (await router.acquire("next", 8)).worker_id == "w1"  # the less loaded
        assert (await router.acquire("next2", 8)).worker_id == "w1"
        assert (await router.acquire("next3", 8)).worker_id in ("w0", "w1")

    run(main())


def test_release_before_acquire_and_unknown_release():
    async def main():
        router = Router(health_interval_s=60)
        await router.add_worker("w", FakeWorker("w"))
        router.release("early")  # the caller gave up before its acquire arrived
        assert await router.acquire("early", 1) is None
        router.release("never-seen")  # harmless
        assert (await router.acquire("ok", 1)).worker_id == "w"

    run(main())


def test_workers_join_and_leave():
    async def main():
        router = Router(health_interval_s=60)
        with pytest.raises(NoWorkers):
            await router.acquire("x", 1)
        a = FakeWorker("a", seqs=1)
        await router.add_worker("a", a)
        await router.acquire("r1", 1)
        queued = asyncio.create_task(router.acquire("r2", 1))
        assert await _pending(queued)
        await router.add_worker("b", FakeWorker("b", seqs=1))  # a join admits the queue
        assert (await queued).worker_id == "b"
        queued2 = asyncio.create_task(router.acquire("r3", 1))
        assert await _pending(queued2)
        a.dead = True
        assert await router.worker_failed("a")  # confirmed dead: removed, ledger dropped
        assert [w["worker_id"] for w in (await router.stats())["workers"]] == ["b"]
        router.release("r2")
        assert (await queued2).worker_id == "b"
        queued3 = asyncio.create_task(router.acquire("r4", 1))
        assert await _pending(queued3)
        router.remove_worker("b")  # the last one left: the queue fails fast
        with pytest.raises(NoWorkers):
            await queued3

    run(main())


def test_merge_chunks_concatenates_per_sample():
    from raysvc.cluster.client import merge_chunks
    from raysvc.cluster.messages import SeqDelta, StreamChunk

    a = StreamChunk(4, [SeqDelta(0, [1, 2], [{1: (-0.1, 1)}, {2: (-0.2, 1)}]),
                        SeqDelta(1, [7])])
    b = StreamChunk(4, [SeqDelta(0, [3], [{3: (-0.3, 1)}], "length")], finished=False)
    m = merge_chunks(a, b)
    assert [(d.index, d.token_ids, d.finish_reason) for d in m.deltas] == [
        (0, [1, 2, 3], "length"), (1, [7], None)]
    assert [list(x) for x in m.deltas[0].logprobs] == [[1], [2], [3]]
    assert a.deltas[0].token_ids == [1, 2]  # inputs untouched
