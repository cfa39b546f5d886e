"""`WorkerPool`: the router's elastic set of worker actors — start, ready, drain, stop.

It runs inside the router actor, next to the ledger it reads. Every `metrics_interval_s`
it asks the policy (`autoscaler.py`) for a target and moves the pool toward it:

- **Scale up** starts worker actors with their resource requests (`num_gpus=1` on a GPU
  cluster). An actor Ray cannot place yet stays *pending*; on a cluster with Ray's
  autoscaler (KubeRay included) that pending actor is the demand that brings a node. A
  worker joins the router — takes traffic — only once its constructor returned, that is
  once its engine is loaded and warmed up. One not ready within `worker_start_timeout_s`,
  or whose constructor failed (bad model path on one node, out of memory), is reported in
  the stats and the log, stopped, and started again after a back-off that doubles with
  each failure in a row (1 s .. 60 s); the rest keep serving.
- **Scale down** drains: a worker still starting is stopped first (it holds no work);
  otherwise the one whose loss costs least — idle first, then on the node with the
  fewest other workers (so whole nodes empty and Ray can give them back), then least
  admitted work, then least cached prefix. The router stops placing on it and its
  running requests move to other workers with their KV (live migration,
  `migrate_on_drain`); any it keeps (n > 1 samples) finish there, or at `drain_timeout_s`
  are handed over to other workers by the seamless failover; once the migrated KV was
  taken, the actor is killed and its prefix index dropped.
- **Node drain**: Ray marks a node as draining before it removes it (preemption — a
  KubeRay pod being deleted — or the autoscaler's idle termination); workers on such a
  node drain the same way, handing their requests over before the drain's deadline, and
  the policy's count no longer includes them, so their replacements start elsewhere.
- A member that died is replaced: Ray restarts it (`max_restarts`) and it re-joins, or,
  if it is gone for good, the pool starts another.

`launch` and `kill` are injected so the pool's logic runs in tests without Ray. The pool
sees the router only through `PoolHost`, the protocol below: the pool decides how many
workers and which; the router owns membership, the ledger and the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from raysvc.cluster.autoscaler import AutoscalingConfig, Decision, ScalingPolicy

if TYPE_CHECKING:
    from raysvc.cluster.autoscaler import PoolSignals
    from raysvc.cluster.messages import WorkerInfo
    from raysvc.cluster.metrics import ClusterMetrics
    from raysvc.cluster.placement import WorkerEntry

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
NODE_POLL_S = 5.0


class PoolHost(Protocol):
    """What the pool asks of the router (the `Router` implements it)."""

    metrics: ClusterMetrics

    def pool_signals(self, now: float, current: int) -> PoolSignals:
        """Demand and load as the ledger and queue show them, for the scaling policy."""

    def entry(self, worker_id: str) -> WorkerEntry | None:
        """The router's entry of a member worker (None: not a member now)."""

    async def add_worker(self, worker_id: str, handle: Any) -> WorkerInfo:
        """Take a started worker in once its engine is healthy (raises if it is not)."""

    def remove_worker(self, worker_id: str) -> bool:
        """Forget a worker at once (it died, or its start is abandoned)."""

    async def remove_after_drain(self, worker_id: str, timeout_s: float,
                                 migrate: bool = True) -> bool:
        """Stop placing on a worker, move its running requests off with their KV
        (`migrate`), let the rest finish (hand them over at `timeout_s`), remove it."""

    def pool_changed(self) -> None:
        """A member failed to start: queued requests may have nobody left to wait for."""


@dataclass(slots=True)
class Member:
    """One worker actor the pool started, and where it is in its life."""

    worker_id: str
    handle: Any
    state: str  # "starting" | "ready" | "draining"
    since: float  # when it entered `state` (monotonic)
    task: asyncio.Task | None = None  # its start or drain
    node_id: str | None = None

    def row(self, now: float) -> dict[str, Any]:
        """Its row in /cluster/stats while it is not yet a router member."""
        return {"worker_id": self.worker_id, "state": self.state,
                "pending_s": round(now - self.since, 1)}


class WorkerPool:
    def __init__(self, router: PoolHost, launch: Callable[[str], Any],
                 kill: Callable[[Any], None], min_workers: int, max_workers: int,
                 config: AutoscalingConfig | dict | None = None, seats_per_worker: int = 256,
                 draining_nodes: Callable[[], dict[str, float]] | None = None) -> None:
        self.router = router
        self.launch = launch
        self.kill = kill
        self.config = AutoscalingConfig.parse(config)
        self.policy = ScalingPolicy(self.config, min_workers, max_workers)
        self.default_seats = seats_per_worker
        self.draining_nodes = draining_nodes
        self.members: dict[str, Member] = {}
        self.target = min_workers
        self.decisions: deque[Decision] = deque(maxlen=16)
        self.last_decision: Decision | None = None  # the latest, "steady" ones included
        self.start_failures = 0  # in all
        self.last_start_error: str | None = None
        self._failures_in_a_row = 0
        self._retry_at = 0.0
        self._next_id = 0
        self._loop: asyncio.Task | None = None
        self._nodes_checked = 0.0

    @property
    def min_workers(self) -> int:
        return self.policy.min_workers

    @property
    def max_workers(self) -> int:
        return self.policy.max_workers

    # -- life --------------------------------------------------------------------------

    async def start(self, initial: int, timeout_s: float,
                    adopt: dict[str, Any] | None = None) -> int:
        """Start `initial` workers and the scaling loop; return how many became ready.

        `adopt` (worker id -> handle) are live workers of this application found by name
        (a restarted router): they join first and count toward `initial`. Waits until
        every initial worker is ready or has failed once (a bad checkpoint fails fast
        instead of retrying forever in front of its operator); raises if none became
        ready. Failed ones keep being retried by the loop.
        """
        adopted = [self._adopt(worker_id, handle) for worker_id, handle in (adopt or {}).items()]
        self.target = min(max(initial, len(adopted), self.min_workers), self.max_workers)
        first = adopted + [self._launch() for _ in range(self.target - len(adopted))]
        tasks = [m.task for m in first if m.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        ready = sum(1 for m in first if m.state == "ready")
        self._loop = asyncio.create_task(self._run())
        if not ready:
            raise RuntimeError(f"no worker became ready within {timeout_s:g}s; last error: "
                               f"{self.last_start_error}")
        return ready

    def stop(self, kill: bool = False) -> None:
        """Stop scaling; with `kill`, stop every member too (the application is ending)."""
        if self._loop is not None:
            self._loop.cancel()
        for m in list(self.members.values()):
            if m.task is not None:
                m.task.cancel()
            if kill and m.handle is not None:
                self.kill(m.handle)
        if kill:
            self.members.clear()

    def _adopt(self, worker_id: str, handle: Any) -> Member:
        """Take a live worker of this application back (it keeps its requests)."""
        m = Member(worker_id, handle, "starting", time.monotonic())
        self.members[worker_id] = m
        ordinal = _ordinal(worker_id)
        if ordinal >= self._next_id:
            self._next_id = ordinal + 1
        m.task = asyncio.create_task(self._ready(m))
        return m

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad tick stop scaling
                logger.exception("worker pool: scaling step failed")

    async def tick(self, now: float | None = None) -> Decision:
        """One scaling step: re-sync with the router, decide, act."""
        now = time.monotonic() if now is None else now
        self._adopt_restarted()
        await self._drain_leaving_nodes(now)
        decision = self.policy.decide(self.router.pool_signals(now, self.active_count()))
        self.last_decision = decision
        if decision.target != self.target:
            logger.warning("worker pool: %d -> %d workers: %s", self.active_count(),
                           decision.target, decision.reason)
            self.decisions.append(decision)
            self.target = decision.target
        self._scale(now)
        states = [m.state for m in self.members.values()]
        self.router.metrics.pool(self.target, states.count("ready"), states.count("starting"),
                                 states.count("draining"))
        return decision

    def active_count(self) -> int:
        return sum(1 for m in self.members.values() if m.state != "draining")

    def can_grow(self) -> bool:
        """Whether waiting for a worker makes sense (one is coming, or may be started)."""
        return any(m.state == "starting" for m in self.members.values()) or (
            self._failures_in_a_row < 3 and self.active_count() < self.max_workers)

    # -- scaling -----------------------------------------------------------------------

    def _scale(self, now: float) -> None:
        active = [m for m in self.members.values() if m.state != "draining"]
        if len(active) < self.target:
            if now >= self._retry_at:
                for _ in range(self.target - len(active)):
                    self._launch()
            return
        surplus = len(active) - self.target
        starting = sorted((m for m in active if m.state == "starting"),
                          key=lambda m: m.since, reverse=True)
        for m in starting[:surplus]:  # not yet serving: nothing to drain
            self._discard(m, "not needed any more")
            surplus -= 1
        for m in self._victims(surplus):
            self._begin_drain(m, "scale-down")

    def _victims(self, count: int) -> list[Member]:
        """The `count` ready workers whose loss costs least."""
        if count <= 0:
            return []
        ready = [m for m in self.members.values() if m.state == "ready"]
        entries = {m.worker_id: self.router.entry(m.worker_id) for m in ready}
        per_node: dict[str, int] = {}
        for m in ready:
            per_node[m.node_id or ""] = per_node.get(m.node_id or "", 0) + 1
        chosen: list[Member] = []
        for _ in range(count):
            def cost(m: Member) -> tuple:
                e = entries[m.worker_id]
                busy = bool(e and e.admitted)
                return (busy, per_node[m.node_id or ""],
                        e.used_seqs if e else 0, e.used_blocks if e else 0,
                        len(e.index.cached) if e else 0, -_ordinal(m.worker_id))

            candidates = [m for m in ready if m not in chosen]
            if not candidates:
                break
            pick = min(candidates, key=cost)
            chosen.append(pick)
            per_node[pick.node_id or ""] -= 1
        return chosen

    def _launch(self) -> Member:
        worker_id = f"worker-{self._next_id}"
        self._next_id += 1
        now = time.monotonic()
        m = Member(worker_id, None, "starting", now)
        self.members[worker_id] = m
        try:
            m.handle = self.launch(worker_id)
        except Exception as e:  # bad resource request, Ray refusing: counts as a failure
            self._failed(m, f"could not be created: {e!r}")
            return m
        m.task = asyncio.create_task(self._ready(m))
        return m

    async def _ready(self, m: Member) -> None:
        timeout = self.config.worker_start_timeout_s
        try:
            info = await asyncio.wait_for(self._join(m), timeout)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._failed(m, f"not ready after {timeout:g}s (pending: no node has room for "
                            f"it yet, or its model loads slowly)")
            return
        except Exception as e:  # its constructor failed: bad model path, out of memory
            self._failed(m, f"failed to start: {_short(e)}")
            return
        if self.members.get(m.worker_id) is not m:  # discarded meanwhile
            self.router.remove_worker(m.worker_id)
            return
        m.state, m.since, m.node_id, m.task = "ready", time.monotonic(), info.node_id, None
        self._failures_in_a_row = 0
        logger.warning("worker pool: %s ready on node %s", m.worker_id, info.node_id[:12])

    async def _join(self, m: Member):
        """The worker's facts once it is up, and it a router member; a worker that Ray is
        restarting refuses calls for a moment: ask again."""
        while True:
            try:
                return await self.router.add_worker(m.worker_id, m.handle)
            except Exception as e:
                if type(e).__name__ != "ActorUnavailableError":
                    raise
                await asyncio.sleep(0.5)

    def _failed(self, m: Member, why: str) -> None:
        self.start_failures += 1
        self._failures_in_a_row += 1
        self.last_start_error = f"{m.worker_id}: {why}"
        backoff = min(2.0 ** (self._failures_in_a_row - 1), MAX_BACKOFF_S)
        self._retry_at = time.monotonic() + backoff
        logger.warning("worker pool: %s %s; retrying in %.0fs", m.worker_id, why, backoff)
        self._discard(m, why, log=False)
        self.router.pool_changed()

    def _discard(self, m: Member, why: str, log: bool = True) -> None:
        if log:
            logger.warning("worker pool: stopping %s (%s): %s", m.worker_id, m.state, why)
        self.members.pop(m.worker_id, None)
        if m.task is not None and m.task is not asyncio.current_task():
            m.task.cancel()
        if m.handle is not None:
            self.kill(m.handle)

    async def drain(self, worker_id: str, timeout_s: float | None = None,
                    migrate: bool | None = None) -> bool:
        """Drain one member by request (an operator, a node going away); True when gone."""
        m = self.members.get(worker_id)
        if m is None or m.state != "ready":
            return False
        task = self._begin_drain(m, "requested", timeout_s, migrate)
        await asyncio.shield(task)
        return True

    def _begin_drain(self, m: Member, why: str, timeout_s: float | None = None,
                     migrate: bool | None = None) -> asyncio.Task:
        logger.warning("worker pool: draining %s (%s)", m.worker_id, why)
        m.state, m.since = "draining", time.monotonic()
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        migrate = self.config.migrate_on_drain if migrate is None else migrate
        m.task = asyncio.create_task(self._drain(m, timeout_s, migrate))
        return m.task

    async def _drain(self, m: Member, timeout_s: float, migrate: bool) -> None:
        try:
            await self.router.remove_after_drain(m.worker_id, timeout_s, migrate)
        finally:
            if self.members.get(m.worker_id) is m:
                m.task = None
                self._discard(m, "drained", log=False)

    # -- re-sync with the router and with Ray --------------------------------------------

    def _adopt_restarted(self) -> None:
        """Members the router lost (the actor died) wait for Ray's restart; one that does
        not come back in time is replaced like a worker that failed to start."""
        for m in list(self.members.values()):
            if m.state == "ready" and self.router.entry(m.worker_id) is None:
                logger.warning("worker pool: %s left the router; waiting for it to re-join",
                               m.worker_id)
                m.state, m.since = "starting", time.monotonic()
                m.task = asyncio.create_task(self._ready(m))

    async def _drain_leaving_nodes(self, now: float) -> None:
        if self.draining_nodes is None or now - self._nodes_checked < NODE_POLL_S:
            return
        self._nodes_checked = now
        try:
            leaving = await asyncio.to_thread(self.draining_nodes)
        except Exception as e:
            logger.debug("worker pool: node states unavailable: %r", e)
            return
        for m in list(self.members.values()):
            if m.state == "ready" and m.node_id in leaving:
                deadline_ms = leaving[m.node_id]  # Ray kills the node then: finish before
                timeout = self.config.drain_timeout_s
                if deadline_ms:
                    timeout = min(timeout, max(deadline_ms / 1000 - time.time() - 5.0, 0.0))
                self._begin_drain(m, f"its node {m.node_id[:12]} is being drained by Ray",
                                  timeout)

    # -- stats -------------------------------------------------------------------------

    def state_of(self, worker_id: str) -> str | None:
        m = self.members.get(worker_id)
        return None if m is None else m.state

    def stats(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        wall = time.time()
        states = [m.state for m in self.members.values()]
        return {
            "target_workers": self.target, "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "ready_workers": states.count("ready"), "starting_workers": states.count("starting"),
            "draining_workers": states.count("draining"),
            "worker_start_failures": self.start_failures,
            "last_start_error": self.last_start_error,
            "scaling_decisions": [{**d.as_dict(), "time": round(wall - (now - d.time), 3)}
                                  for d in self.decisions],
            "last_scaling_decision": None if self.last_decision is None else {
                **self.last_decision.as_dict(),
                "time": round(wall - (now - self.last_decision.time), 3)},
            "autoscaling": self.config.model_dump(),
        }

    def starting_rows(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.monotonic() if now is None else now
        return [m.row(now) for m in self.members.values()
                if m.state == "starting" and self.router.entry(m.worker_id) is None]


def _ordinal(worker_id: str) -> int:
    tail = worker_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _short(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
