"""The batched admission protocol, without Ray: the ingress's real `TicketBatcher` against a
real in-process `Router` (its `exchange` wrapped so `.remote()` returns a future).

Checked: many requests share few router calls; queued tickets are answered by the long
poll as room frees, in priority order; a refusal reaches its own request only; a router
restart (a new incarnation) gets every waited-for ticket asked again; a cancelled wait
leaves nothing queued; `avoid` keeps a handed-over request off its old worker; a joining
worker takes its share of another's not-started backlog (rebalancing).
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import RemoteMethod as _Method

from raysvc.cluster.messages import AcquireRequest, Overloaded, WorkerInfo, WorkerLoad
from raysvc.cluster.router import Router
from raysvc.cluster.tickets import TicketBatcher


class RouterHandle:
    """A Router as an actor handle looks to the batcher; counts the calls and replaces the
    router on `restart()` (a new incarnation, as after Ray restarted the actor)."""

    def __init__(self, router: Router) -> None:
        self.router, self.calls = router, 0
        self.exchange = _Method(self._exchange)

    async def _exchange(self, *args):
        self.calls += 1
        return await self.router.exchange(*args)


class FakeWorker:
    def __init__(self, worker_id: str, seqs: int = 64, waiting: int = 0):
        self.value = WorkerInfo(worker_id, "node", 1, "cpu", "m", 512, 100, 16, 1000, seqs)
        self.waiting = waiting
        self.shed_asked: list[int] = []
        self.info = _Method(self._info)
        self.load = _Method(self._load)
        self.health = _Method(self._load)
        self.requests = _Method(self._requests)
        self.shed = _Method(self._shed)

    async def _info(self):
        return self.value

    async def _requests(self):
        return []

    async def _load(self):
        return WorkerLoad(waiting=self.waiting, kv_blocks_total=1000, kv_blocks_free=1000)

    async def _shed(self, count):
        self.shed_asked.append(count)
        return count


async def _router(*workers, **kwargs) -> Router:
    router = Router(health_interval_s=3600, report_timeout_s=1, **kwargs)
    for w in workers:
        await router.add_worker(w.value.worker_id, w)
    return router


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_many_requests_share_few_router_calls_and_handles_travel_once():
    async def main():
        a, b = FakeWorker("a"), FakeWorker("b")
        handle = RouterHandle(await _router(a, b))
        batcher = TicketBatcher(handle)
        tickets = await asyncio.gather(*(batcher.acquire(AcquireRequest(f"r{i}", 16))
                                         for i in range(100)))
        assert {t.worker_id for t in tickets} == {"a", "b"}
        assert all(t.worker is (a if t.worker_id == "a" else b) for t in tickets)
        assert handle.calls <= 3, handle.calls  # one call carried (nearly) all of them
        assert len(handle.router.ledger) == 100
        for t in tickets:
            batcher.release(t.ticket_id)
        await asyncio.sleep(0.05)
        assert len(handle.router.ledger) == 0 and handle.calls <= 5

    run(main())


def test_queued_tickets_come_by_long_poll_in_priority_order():
    async def main():
        handle = RouterHandle(await _router(FakeWorker("a", seqs=1)))
        batcher = TicketBatcher(handle)
        first = await batcher.acquire(AcquireRequest("first", 16))
        later = asyncio.create_task(batcher.acquire(AcquireRequest("later", 16, priority=3)))
        await asyncio.sleep(0.02)
        urgent = asyncio.create_task(batcher.acquire(AcquireRequest("urgent", 16,
                                                                    priority=-1)))
        await asyncio.sleep(0.05)
        assert not later.done() and not urgent.done()
        batcher.release(first.ticket_id)
        assert (await urgent).worker_id == "a"  # lower priority value first
        assert not later.done()
        batcher.release("urgent")
        assert (await later).worker_id == "a"

    run(main())


def test_a_refusal_reaches_its_own_request_only():
    async def main():
        handle = RouterHandle(await _router(FakeWorker("a", seqs=1), max_queue_len=1))
        batcher = TicketBatcher(handle)
        await batcher.acquire(AcquireRequest("running", 16))
        queued = asyncio.create_task(batcher.acquire(AcquireRequest("queued", 16)))
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded):
            await batcher.acquire(AcquireRequest("one-too-many", 16))
        assert not queued.done()
        batcher.release("running")
        assert (await queued).worker_id == "a"

    run(main())


def test_a_restarted_router_is_asked_again_for_waited_tickets():
    async def main():
        worker = FakeWorker("a", seqs=1)
        handle = RouterHandle(await _router(worker))
        batcher = TicketBatcher(handle)
        await batcher.acquire(AcquireRequest("running", 16))
        waiting = asyncio.create_task(batcher.acquire(AcquireRequest("waiting", 16)))
        await asyncio.sleep(0.05)
        handle.router = await _router(worker)  # the old queue is gone with the old router
        assert (await asyncio.wait_for(waiting, 5)).worker_id == "a"
        assert handle.router.ledger.owner("waiting") is not None

    run(main())


def test_a_cancelled_wait_leaves_nothing_queued():
    async def main():
        handle = RouterHandle(await _router(FakeWorker("a", seqs=1)))
        batcher = TicketBatcher(handle)
        await batcher.acquire(AcquireRequest("running", 16))
        waiting = asyncio.create_task(batcher.acquire(AcquireRequest("gone", 16)))
        await asyncio.sleep(0.05)
        assert len(handle.router._queue) == 1
        waiting.cancel()
        batcher.release("gone")  # what ClusterClient's finally does
        await asyncio.sleep(0.05)
        assert len(handle.router._queue) == 0
        batcher.release("running")
        await asyncio.sleep(0.05)
        assert len(handle.router.ledger) == 0

    run(main())


def test_avoid_keeps_a_handed_over_request_off_its_worker():
    async def main():
        router = await _router(FakeWorker("a"), FakeWorker("b"))
        hashes = [b"h" * 16, b"i" * 16]
        router.entry("a").index.place(hashes)  # "a" holds the prefix: it would win
        assert (await router.acquire("x", 40, 1, hashes)).worker_id == "a"
        assert (await router.acquire("y", 40, 1, hashes, avoid="a")).worker_id == "b"
        lone = await _router(FakeWorker("c"))  # nobody else: the avoided worker serves
        assert (await lone.acquire("z", 40, 1, hashes, avoid="c")).worker_id == "c"

    run(main())


def test_a_joining_worker_takes_its_share_of_the_backlog():
    async def main():
        busy = FakeWorker("busy", waiting=9)
        router = await _router(busy)
        await router.refresh()  # the busy worker's report: 9 requests not started
        assert busy.shed_asked == []  # nobody to give them to
        await router.add_worker("new", FakeWorker("new"))
        await asyncio.sleep(0.05)
        assert busy.shed_asked == [4]  # 9 waiting, 2 workers: it keeps ceil(9 / 2) = 5
        assert router.rebalanced == 4
        await router.refresh()
        router._rebalance()  # asked again before its reports caught up: not again
        await asyncio.sleep(0.05)
        assert busy.shed_asked == [4]

    run(main())


def test_under_overload_tenants_take_turns():
    """One seat; tenant "flood" queues 10 requests, then "quiet" queues 2: as the seat
    frees, the quiet tenant's requests are admitted second and fourth, not after the
    flood (FIFO would make them 11th and 12th)."""
    async def main():
        router = await _router(FakeWorker("a", seqs=1))
        await router.acquire("running", 16)
        order: list[str] = []

        async def ask(ticket_id, tenant):
            await router.acquire(ticket_id, 16, 1, None, False, 0, tenant)
            order.append(ticket_id)

        tasks = [asyncio.create_task(ask(f"flood{i}", "flood")) for i in range(10)]
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(ask(f"quiet{i}", "quiet")) for i in range(2)]
        await asyncio.sleep(0.01)
        router.release("running")
        for _ in range(12):
            await asyncio.sleep(0.005)
            router.release(order[-1])
        await asyncio.gather(*tasks)
        assert order[:4] == ["flood0", "quiet0", "flood1", "quiet1"], order

    run(main())
