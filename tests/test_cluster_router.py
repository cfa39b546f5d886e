"""Router admission control, without Ray: fake worker handles with `.remote()` methods.

The router is a plain class (Ray makes it an actor), so its queue, ledger and placement
are tested directly: FCFS order, the bound (Overloaded), batch slots and KV blocks,
least-loaded placement, release, cancellation, and workers joining and leaving.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import RemoteMethod as _Method

from raysvc.cluster.messages import NoWorkers, Overloaded, WorkerInfo, WorkerLoad
from raysvc.cluster.router import Router


class FakeWorker:
    def __init__(self, worker_id: str, blocks: int = 100, seqs: int = 2, block_size: int = 16):
        self.info_value = WorkerInfo(worker_id, "node", 1, "cpu", "m", 512, 100, block_size,
                                     blocks, seqs)
        self.dead = False
        self.holding: list[tuple[str, int, int]] = []  # (request id, prompt tokens, n)
        self.info = _Method(self._info)
        self.load = _Method(self._load)
        self.health = _Method(self._load)
        self.requests = _Method(self._requests)

    async def _requests(self):
        return list(self.holding)

    async def _info(self):
        return self.info_value

    async def _load(self):
        if self.dead:
            raise RuntimeError("dead")
        return WorkerLoad(kv_blocks_total=self.info_value.kv_blocks_total,
                          kv_blocks_free=self.info_value.kv_blocks_total,
                          request_ids=[r for r, _, _ in self.holding])


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


def test_a_router_rebuilds_its_ledger_from_the_workers():
    """A restarted router starts empty; joining workers tell it what they run, so it admits
    exactly the room that is really left (the workers are the truth)."""
    async def main():
        router = Router(health_interval_s=60)
        w = FakeWorker("w", blocks=10, seqs=3, block_size=16)
        w.holding = [("old-a", 64, 1), ("old-b", 16, 1)]  # 5 + 2 blocks, 2 seats
        await router.add_worker("w", w)
        row = (await router.stats())["workers"][0]
        assert row["requests_admitted"] == 2
        await router.acquire("new", 16)  # the last seat (2 blocks: 9 of 10)
        late = asyncio.create_task(router.acquire("late", 16))
        assert await _pending(late)
        router.release("old-a")  # its client finishes and releases as usual
        assert (await late).worker_id == "w"
        for t in ("old-b", "new", "late"):
            router.release(t)
        assert (await router.stats())["workers"][0]["requests_admitted"] == 0

    run(main())


def test_tickets_a_worker_does_not_hold_are_released_after_the_grace():
    """A release lost while the router was away would hold seats forever; load reports
    carry what each worker holds, and the router lets go of the rest."""
    async def main():
        router = Router(health_interval_s=60, ledger_grace_s=0.05)
        w = FakeWorker("w", seqs=2)
        await router.add_worker("w", w)
        await router.acquire("held", 8)
        await router.acquire("lost", 8)  # its release never arrives
        w.holding = [("held", 8, 1)]
        await router.refresh()  # within the grace: kept (a ticket before its submit)
        assert (await router.stats())["workers"][0]["requests_admitted"] == 2
        await asyncio.sleep(0.1)
        await router.refresh()
        assert (await router.stats())["workers"][0]["requests_admitted"] == 1
        assert (await router.acquire("next", 8)).worker_id == "w"  # its seat is free again

    run(main())


def test_asking_twice_for_the_same_ticket_admits_once():
    async def main():
        router = Router(health_interval_s=60)
        await router.add_worker("w", FakeWorker("w", seqs=2))
        first = await router.acquire("t", 8)
        again = await router.acquire("t", 8)  # the answer to the first ask was lost
        assert again.worker_id == first.worker_id
        assert (await router.stats())["workers"][0]["requests_admitted"] == 1

    run(main())


def test_a_closing_router_refuses_new_requests_and_counts_the_rest():
    async def main():
        from raysvc.cluster.messages import ShuttingDown

        router = Router(health_interval_s=60)
        await router.add_worker("w", FakeWorker("w", seqs=1))
        await router.acquire("running", 8)
        queued = asyncio.create_task(router.acquire("queued", 8))
        assert await _pending(queued)
        assert router.close() == 2  # still in flight: one running, one queued
        with pytest.raises(ShuttingDown):
            await router.acquire("new", 8)
        router.release("running")
        await queued  # accepted before the close: it still runs
        router.release("queued")
        assert router.close() == 0

    run(main())


def test_a_worker_reported_failed_takes_nothing_until_its_health_is_known():
    """Failovers re-queue at once; while the router asks the reported worker for its
    health, they must not land on it again (a dead worker would fail them again)."""
    async def main():
        router = Router(health_interval_s=60, report_timeout_s=5)
        slow = FakeWorker("slow", seqs=4)
        gate = asyncio.Event()

        async def slow_health():
            await gate.wait()
            return WorkerLoad()

        await router.add_worker("slow", slow)
        await router.add_worker("other", FakeWorker("other", seqs=4))
        slow.health = _Method(slow_health)  # from now on its health takes a while
        check = asyncio.create_task(router.worker_failed("slow"))
        await asyncio.sleep(0.01)
        for i in range(4):  # all go to the other worker while "slow" is in doubt
            assert (await router.acquire(f"r{i}", 8)).worker_id == "other"
        gate.set()  # healthy after all: it takes requests again
        assert await check is False
        assert (await router.acquire("after", 8)).worker_id == "slow"

    run(main())


def test_merge_streams_counts_open_streams_and_closes_them_all():
    from raysvc.cluster.client import merge_streams

    closed = []

    async def gen(name, n, fail=False):
        try:
            for i in range(n):
                await asyncio.sleep(0.001 * (i + 1))
                yield f"{name}{i}"
            if fail:
                raise ValueError(f"{name} failed")
        finally:
            closed.append(name)

    async def main():
        got = [x async for x in merge_streams([gen("a", 2), gen("b", 4)])]
        assert sorted(item for item, _ in got) == ["a0", "a1", "b0", "b1", "b2", "b3"]
        assert got[-1] == ("b3", 1)  # the last item: its stream is the only one open
        assert all(n == 2 for item, n in got if item.startswith("a"))
        with pytest.raises(ValueError, match="a failed"):
            async for _ in merge_streams([gen("a", 1, fail=True), gen("c", 100)]):
                pass
        await asyncio.sleep(0.01)
        assert "c" in closed  # the other stream was closed, not left running

    run(main())
