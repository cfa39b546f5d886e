"""The elastic worker pool's life cycle, without Ray: a real `Router` with fake workers.

The pool is handed `launch` / `kill` functions that make fake worker handles (their
`.remote()` methods are coroutines), so starting, pending, failing, draining, node
preference and hand-over are driven and observed exactly. Ray itself is exercised by
tests/test_cluster_autoscale.py.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from conftest import RemoteMethod as _Method

from raysvc.cluster.messages import WorkerInfo, WorkerLoad
from raysvc.cluster.pool import WorkerPool
from raysvc.cluster.router import Router

FAST = {"upscale_delay_s": 0, "downscale_delay_s": 0, "look_back_period_s": 0.01,
        "metrics_interval_s": 3600, "worker_start_timeout_s": 5, "drain_timeout_s": 5}


class FakeWorker:
    """A worker handle; `gate` holds its start (pending), `fail` makes its start raise."""

    pids = itertools.count(100)

    def __init__(self, worker_id: str, node: str, seqs: int = 4, blocks: int = 100,
                 gate: asyncio.Event | None = None, fail: str | None = None):
        self.value = WorkerInfo(worker_id, node, next(self.pids), "cpu", "m", 512, 100, 16,
                                blocks, seqs)
        self.gate, self.fail = gate, fail
        self.killed = False
        self.handed_over = 0
        self.migrations = 0
        self.info = _Method(self._info)
        self.load = _Method(self._load)
        self.health = _Method(self._load)
        self.hand_over = _Method(self._hand_over)
        self.requests = _Method(self._requests)
        self.migrate = _Method(self._migrate)
        self.migrations_held = _Method(self._held)

    async def _migrate(self, hold_s):
        self.migrations += 1
        return 0, 0  # what it holds cannot move (n > 1 samples): it stays till the deadline

    async def _held(self):
        return 0

    async def _requests(self):
        return []

    async def _info(self):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError(self.fail)
        return self.value

    async def _load(self):
        return WorkerLoad(kv_blocks_total=self.value.kv_blocks_total,
                          kv_blocks_free=self.value.kv_blocks_total)

    async def _hand_over(self):
        self.handed_over += 1
        return 0


class Fleet:
    """launch/kill for the pool; `plan` decides each new worker's node and behaviour."""

    def __init__(self, plan=None):
        self.started: dict[str, FakeWorker] = {}
        self.plan = plan or (lambda worker_id: {"node": "n0"})

    def launch(self, worker_id: str) -> FakeWorker:
        w = FakeWorker(worker_id, **self.plan(worker_id))
        self.started[worker_id] = w
        return w

    @staticmethod
    def kill(handle: FakeWorker) -> None:
        handle.killed = True

    def alive(self) -> list[str]:
        return sorted(k for k, w in self.started.items() if not w.killed)


def make(fleet: Fleet, lo=1, hi=4, **knobs):
    router = Router(health_interval_s=3600, report_timeout_s=1)
    pool = WorkerPool(router, fleet.launch, fleet.kill, lo, hi, {**FAST, **knobs},
                      seats_per_worker=4)
    router.attach_pool(pool)
    return router, pool


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def states(pool: WorkerPool) -> dict[str, str]:
    return {wid: m.state for wid, m in sorted(pool.members.items())}


def test_starts_initial_workers_and_reports_them():
    async def main():
        fleet = Fleet()
        router, pool = make(fleet, lo=2, hi=4)
        assert await pool.start(2, timeout_s=5) == 2
        stats = await router.stats()
        assert (stats["target_workers"], stats["min_workers"], stats["max_workers"]) == (2, 2, 4)
        assert [w["state"] for w in stats["workers"]] == ["ready", "ready"]
        assert router.health() == {"ready": 2, "draining": 0, "starting": 0}
        pool.stop()

    run(main())


def test_burst_grows_to_max_and_queue_is_served_by_new_workers():
    async def main():
        fleet = Fleet()
        router, pool = make(fleet, lo=1, hi=3)
        await pool.start(1, 5)
        tickets = [await router.acquire(f"r{i}", 10) for i in range(4)]  # 4 seats: full
        waiting = [asyncio.create_task(router.acquire(f"q{i}", 10)) for i in range(8)]
        await asyncio.sleep(0.01)
        d = await pool.tick()  # 12 seats at 2 per worker (half of 4) -> 6, clamped to 3
        assert d.target == 3 and "clamped" in d.reason
        await asyncio.sleep(0.05)  # the two new workers join and take the queue
        assert states(pool) == {"worker-0": "ready", "worker-1": "ready", "worker-2": "ready"}
        admitted = [await t for t in waiting]
        assert {t.worker_id for t in admitted} == {"worker-1", "worker-2"}
        assert (await router.stats())["scaling_decisions"][-1]["to"] == 3
        for t in tickets + admitted:
            router.release(t.ticket_id)
        pool.stop()

    run(main())


def test_scale_down_drains_the_idle_worker_on_the_emptiest_node():
    async def main():
        nodes = {"worker-0": "a", "worker-1": "a", "worker-2": "b"}
        fleet = Fleet(lambda wid: {"node": nodes[wid]})
        router, pool = make(fleet, lo=1, hi=3)
        await pool.start(3, 5)
        busy0 = await router.acquire("busy", 10)  # one request somewhere
        # target: the one running seat is worth 0.5 workers -> 1; two must go
        await pool.tick()
        draining = {wid for wid, st in states(pool).items() if st == "draining"}
        idle = {"worker-0", "worker-1", "worker-2"} - {busy0.worker_id}
        # the two idle ones go; between idle ones, node b (alone) before a's second worker
        assert draining == idle, (states(pool), busy0.worker_id)
        await asyncio.sleep(0.1)
        assert fleet.alive() == [busy0.worker_id]
        assert list(router.workers()) == [busy0.worker_id]
        router.release("busy")
        pool.stop()

    run(main())


@pytest.mark.parametrize("migrate", [True, False])
def test_draining_worker_finishes_then_hands_over_at_its_deadline(migrate):
    async def main():
        fleet = Fleet()
        router, pool = make(fleet, lo=1, hi=2, drain_timeout_s=0.2, migrate_on_drain=migrate)
        await pool.start(2, 5)
        t0 = await router.acquire("a", 10)
        t1 = await router.acquire("b", 10)
        assert {t0.worker_id, t1.worker_id} == {"worker-0", "worker-1"}  # spread
        pool.target = 1
        pool._scale(0.0)  # noqa: SLF001 - the decision itself is tested above
        (victim,) = [wid for wid, st in states(pool).items() if st == "draining"]
        # not placed on while draining
        t2 = await router.acquire("c", 10)
        assert t2.worker_id != victim
        await asyncio.sleep(0.5)  # past the 0.2 s deadline: its request is handed over
        # live migration is tried first, at the drain's start (unless turned off)
        assert fleet.started[victim].migrations == int(migrate)
        assert fleet.started[victim].handed_over == 1
        mine = t0 if t0.worker_id == victim else t1
        router.release(mine.ticket_id)  # the client moved it (failover releases the ticket)
        await asyncio.sleep(0.2)
        assert victim not in router.workers() and fleet.started[victim].killed
        pool.stop()

    run(main())


def test_pending_worker_is_reported_stopped_and_retried():
    async def main():
        gate = asyncio.Event()  # never set: no node ever has room
        fleet = Fleet(lambda wid: {"node": "n0", "gate": gate if wid != "worker-0" else None})
        router, pool = make(fleet, lo=1, hi=2, worker_start_timeout_s=0.2)
        await pool.start(1, 5)
        pool.target = 2
        pool._scale(0.0)  # noqa: SLF001
        stats = await router.stats()
        assert [w["state"] for w in stats["workers"]] == ["ready", "starting"]
        await asyncio.sleep(0.4)
        stats = await router.stats()
        assert stats["worker_start_failures"] == 1
        assert "worker-1" in stats["last_start_error"] and "not ready" in stats["last_start_error"]
        assert fleet.started["worker-1"].killed
        # retried after the back-off (1 s for the first failure), serving meanwhile
        for r in ("x", "y", "z"):  # 3 seats at 2 per worker: still worth 2 workers
            assert (await router.acquire(r, 10)).worker_id == "worker-0"
        await asyncio.sleep(1.1)
        assert (await pool.tick()).target == 2
        assert "worker-2" in fleet.started and states(pool)["worker-2"] == "starting"
        pool.stop()

    run(main())


def test_failing_worker_start_backs_off_and_does_not_take_the_router_down():
    async def main():
        fleet = Fleet(lambda wid: {"node": "n0",
                                   "fail": None if wid == "worker-0" else "bad model path"})
        router, pool = make(fleet, lo=2, hi=2)
        assert await pool.start(2, 5) == 1  # one of two came up; the other is retried
        stats = await router.stats()
        assert "bad model path" in stats["last_start_error"]
        assert (await router.acquire("x", 10)).worker_id == "worker-0"
        for _ in range(3):  # ticks inside the back-off start nothing
            await pool.tick()
        assert sorted(fleet.started) == ["worker-0", "worker-1"]
        pool._retry_at = 0  # noqa: SLF001 - skip the wait
        await pool.tick()
        await asyncio.sleep(0.05)
        assert sorted(fleet.started) == ["worker-0", "worker-1", "worker-2"]
        assert pool.start_failures == 2 and pool._retry_at > 0  # noqa: SLF001 - backs off more
        pool.stop()

    run(main())


def test_every_start_failing_fails_the_start_and_then_the_queue():
    async def main():
        fleet = Fleet(lambda wid: {"node": "n0", "fail": "CUDA out of memory"})
        router, pool = make(fleet, lo=1, hi=1)
        with pytest.raises(RuntimeError, match="out of memory"):
            await pool.start(1, 5)
        for _ in range(3):
            pool._retry_at = 0  # noqa: SLF001
            await pool.tick()
            await asyncio.sleep(0.05)
        from raysvc.cluster.messages import NoWorkers

        with pytest.raises(NoWorkers, match="out of memory"):
            await router.acquire("x", 10)
        pool.stop()

    run(main())


def test_workers_on_a_draining_node_are_drained():
    async def main():
        nodes = {"worker-0": "a", "worker-1": "b"}
        fleet = Fleet(lambda wid: {"node": nodes.get(wid, "c")})
        leaving: dict[str, float] = {}
        router = Router(health_interval_s=3600)
        pool = WorkerPool(router, fleet.launch, fleet.kill, 2, 3, FAST, seats_per_worker=4,
                          draining_nodes=lambda: dict(leaving))
        router.attach_pool(pool)
        await pool.start(2, 5)
        leaving["b"] = 0.0  # no deadline
        await pool.tick(now=10_000.0)
        assert states(pool)["worker-1"] == "draining"
        await asyncio.sleep(0.05)
        # its replacement starts elsewhere: 2 active again
        assert "worker-1" not in pool.members and states(pool)["worker-2"] == "ready"
        assert fleet.started["worker-2"].value.node_id == "c"
        pool.stop()

    run(main())


def test_a_worker_whose_engine_failed_is_replaced_not_taken_back():
    """An actor that lives on with a dead engine: the router drops it, the pool must not
    re-add it (its health check fails) but stop it and start another."""
    async def main():
        fleet = Fleet()
        router, pool = make(fleet, lo=1, hi=1)
        await pool.start(1, 5)
        sick = fleet.started["worker-0"]

        async def failed():
            raise RuntimeError("worker worker-0: engine failed")

        sick.health = _Method(failed)
        sick.load = _Method(lambda: _unhealthy(sick))
        await router.refresh()  # the load report says unhealthy: dropped
        assert "worker-0" not in router.workers()
        await pool.tick()  # it left the router: the pool tries to take it back, and fails
        await asyncio.sleep(0.05)
        assert sick.killed and "worker-0" not in pool.members
        assert "failed to start" in pool.last_start_error
        pool._retry_at = 0  # noqa: SLF001 - skip the back-off
        await pool.tick()
        await asyncio.sleep(0.05)
        assert states(pool) == {"worker-1": "ready"}
        assert list(router.workers()) == ["worker-1"]
        pool.stop()

    run(main())


async def _unhealthy(worker):
    return WorkerLoad(kv_blocks_total=worker.value.kv_blocks_total, healthy=False)


def _guarded(fleet: Fleet, guard_s: float):
    router = Router(health_interval_s=0.02, report_timeout_s=1, orphan_timeout_s=guard_s)
    pool = WorkerPool(router, fleet.launch, fleet.kill, 1, 1, FAST, seats_per_worker=4)
    router.attach_pool(pool)
    return router, pool


class _Exited(Exception):
    pass


def test_a_model_loading_longer_than_the_orphan_guard_comes_up(monkeypatch):
    """The cluster replica's constructor waits for the first worker (a 7B model loads for
    minutes); its keepalives beat meanwhile (`_keepalive_while_starting`), so the router's
    orphan guard does not stop the worker it waits for. Once the beats stop for good, the
    guard still fires."""
    import ray

    from raysvc.serve.app import _keepalive_while_starting

    def exit_actor():
        raise _Exited

    monkeypatch.setattr(ray.actor, "exit_actor", exit_actor)

    class Handle:  # the router's actor handle, as the replica's beat thread uses it
        def __init__(self, router):
            self.keepalive = type("M", (), {"remote": staticmethod(router.keepalive)})

    async def main():
        gate = asyncio.Event()
        fleet = Fleet(lambda wid: {"node": "n0", "gate": gate})
        router, pool = _guarded(fleet, guard_s=0.2)
        beating = _keepalive_while_starting(Handle(router), period_s=0.05)
        asyncio.get_running_loop().call_later(0.6, gate.set)  # loads 3x longer than the guard
        try:
            assert await pool.start(1, 5) == 1
            await asyncio.sleep(0.3)  # the guard has looked several times by now
            assert fleet.alive() == ["worker-0"] and list(router.workers()) == ["worker-0"]
        finally:
            beating.set()
        monitor = router._monitor  # noqa: SLF001 - the guard's loop
        await asyncio.wait({monitor}, timeout=5)  # no owner any more: the guard fires
        assert monitor.done() and isinstance(monitor.exception(), _Exited)
        assert fleet.alive() == []
        pool.stop()

    run(main())


def test_after_a_router_restart_the_first_ready_worker_admits_and_the_queue_is_bounded():
    """A restarted router rebuilds from its workers; one adopted worker is ready, another
    is still loading. Requests are admitted by the ready one at once (not after every
    worker is ready), and those waiting count against max_queue_len like any others."""
    from raysvc.cluster.messages import Overloaded

    async def main():
        gate = asyncio.Event()  # worker-1 keeps loading
        fleet = Fleet(lambda wid: {"node": "n0", "gate": gate if wid == "worker-1" else None})
        router = Router(health_interval_s=3600, report_timeout_s=1, max_queue_len=2)
        pool = WorkerPool(router, fleet.launch, fleet.kill, 2, 2, FAST, seats_per_worker=4)
        router.attach_pool(pool)
        router.restarted = True  # as a restarted actor is: rebuilding until start returns
        router._started.clear()  # noqa: SLF001
        starting = asyncio.create_task(pool.start(2, 5))
        await asyncio.sleep(0.05)
        assert not starting.done()
        admitted = await asyncio.wait_for(
            asyncio.gather(*(router.acquire(f"r{i}", 10) for i in range(4))), 1)
        assert {t.worker_id for t in admitted} == {"worker-0"}
        queued = [asyncio.create_task(router.acquire(f"q{i}", 10)) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await router.acquire("one-too-many", 10)
        gate.set()  # worker-1 ready: it takes the queue
        assert {(await t).worker_id for t in queued} == {"worker-1"}
        await starting
        pool.stop()

    run(main())


def test_stats_say_why_the_pool_stays_as_it_is():
    """A load below one worker's target never scales up; /cluster/stats says so, with the
    numbers (the held-out burst of 40 streams at 128 per worker looked like a dead
    autoscaler without them)."""
    async def main():
        fleet = Fleet()
        router, pool = make(fleet, lo=1, hi=3)
        await pool.start(1, 5)
        tickets = [await router.acquire(f"r{i}", 10) for i in range(1)]
        await pool.tick()
        last = (await router.stats())["last_scaling_decision"]
        assert (last["from"], last["to"]) == (1, 1)
        assert last["reason"].startswith("steady: demand of 0.50 workers (1 running + 0 "
                                         "queued seqs at 2 per worker)"), last
        for t in tickets:
            router.release(t.ticket_id)
        pool.stop()

    run(main())


def test_a_config_update_keeps_the_workers_and_a_deleted_app_stops_them(monkeypatch):
    """Serve stops the old cluster replica of an update before or after it starts the new
    one; the old one abandons the router: requests go on being admitted, and the new
    replica's claim keeps every worker. With no claim (the app was deleted) the router
    stops its workers after the grace period."""
    import ray

    monkeypatch.setattr(ray.actor, "exit_actor", lambda: (_ for _ in ()).throw(_Exited()))
    monkeypatch.setattr(ray, "kill", lambda handle: None)

    async def main():
        fleet = Fleet()
        router, pool = make(fleet, lo=1, hi=1)
        await pool.start(1, 5)
        router.claim("old")
        assert await router.abandon("old", drain_s=0, grace_s=0.2)
        ticket = await router.acquire("during-the-update", 10)  # no 503 meanwhile
        router.claim("new")  # the update's new replica
        await asyncio.sleep(0.4)
        assert fleet.alive() == ["worker-0"] and not router._closing  # noqa: SLF001
        assert not await router.abandon("old", drain_s=0, grace_s=0.2)  # not the owner
        router.release(ticket.ticket_id)

        assert await router.abandon("new", drain_s=0, grace_s=0.2)  # deleted for real
        task = router._abandoned  # noqa: SLF001
        await asyncio.wait({task}, timeout=5)
        assert isinstance(task.exception(), _Exited) and fleet.alive() == []
        pool.stop()

    run(main())
