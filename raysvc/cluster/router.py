"""`Router`: the cluster's one waiting queue and its admission control (control plane only).

A caller asks for a ticket (`acquire`); the router answers when some worker has room for
the request — batch slots for its `n` samples and KV blocks for its prompt — and names
that worker. The caller then streams tokens from the worker directly and `release`s the
ticket when done, which admits the next request. Requests that find no room wait in one
FCFS queue (bounded: a full queue refuses with `Overloaded`, HTTP 429), so the cluster
batches continuously as a whole: each worker runs its own iteration-level batch and the
router keeps every one of them fed.

Room is judged on the router's own ledger (what it admitted and not yet released), not on
load reports, which are always a little stale; the engine absorbs decode growth with
preemption. Placement among the workers with room is prefix-aware (`placement.py`): each
worker's `PrefixIndex` is fed by that worker's exact KV events through one long-poll task
per worker. Workers join (and a restarted one re-joins) at any time; `drain_worker` stops
placing on one and removes it once its requests are done (or hands them over to the
others at its deadline). A monitor polls load reports for /cluster/stats and the metrics,
and drops a worker that died or whose engine failed (a slow report is only stale).

Given a `worker_spec`, the router also owns an elastic pool of workers (`pool.py`):
`start_workers` starts the initial ones, and the pool grows and drains them between
`min_workers` and `max_workers` with the demand this ledger and queue show.

Nothing here is the only copy (the workers are the truth): an application's router is a
named actor that Ray restarts, and a restarted one rebuilds itself from its workers —
their names give membership, each worker's `requests` the admission ledger, and the KV
event protocol's snapshot each prefix index. Every load report also carries the worker's
request ids, so a ticket whose release was lost (sent while the router was down) is
dropped after `ledger_grace_s` instead of holding its seats forever. While the rebuild
runs, requests queue as usual (bounded by `max_queue_len`), and the first worker to
re-join admits them: none waits for every adopted worker to be ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raysvc.cluster.actors import was_restarted
from raysvc.cluster.ledger import AdmissionLedger
from raysvc.cluster.messages import (
    AcquireRequest,
    ExchangeReply,
    NoWorkers,
    Overloaded,
    ShuttingDown,
    Ticket,
    WorkerInfo,
    WorkerLoad,
)
from raysvc.cluster.metrics import ClusterMetrics
from raysvc.cluster.placement import PlacementConfig, Placer, WorkerEntry, pull_cost
from raysvc.cluster.prefix_index import PrefixIndex
from raysvc.cluster.wait_queue import Waiting, WaitQueue

if TYPE_CHECKING:
    from raysvc.cluster.autoscaler import PoolSignals
    from raysvc.cluster.launch import AppNames, WorkerSpec
    from raysvc.cluster.pool import WorkerPool

logger = logging.getLogger(__name__)


BOX_IDLE_S = 120.0  # a client that has not called `exchange` this long is gone
# how long a draining worker holds a migrated request's KV for its continuation's worker
# (which may have to wait in the queue for room) before it recomputes instead
MIGRATION_HOLD_S = 60.0


@dataclass(slots=True, eq=False)
class _Box:
    """One client's (ingress process's) answers not yet collected, and which worker
    handles it has been sent."""

    results: list[tuple[str, Any]] = field(default_factory=list)
    news: asyncio.Event = field(default_factory=asyncio.Event)
    handles_sent: dict[str, Any] = field(default_factory=dict)  # worker id -> handle sent
    handles: dict[str, Any] = field(default_factory=dict)  # to send with the next reply
    seen: float = 0.0

    def put(self, ticket_id: str, result: Any,
            pull: tuple[WorkerEntry, int] | None = None) -> None:
        if isinstance(result, WorkerEntry):
            self._send_handle(result)
            if pull is not None:  # (worker, pull source, blocks)
                self._send_handle(pull[0])
                result = (result.worker_id, pull[0].worker_id, pull[1])
            else:
                result = result.worker_id
        self.results.append((ticket_id, result))
        self.news.set()

    def _send_handle(self, entry: WorkerEntry) -> None:
        if self.handles_sent.get(entry.worker_id) is not entry.handle:
            self.handles_sent[entry.worker_id] = entry.handle
            self.handles[entry.worker_id] = entry.handle


class Router:
    def __init__(self, max_queue_len: int = 1024, max_seqs_per_worker: int | None = None,
                 health_interval_s: float = 1.0, report_timeout_s: float = 10.0,
                 placement: PlacementConfig | dict[str, Any] | None = None,
                 events_wait_s: float = 1.0, worker_spec: WorkerSpec | None = None,
                 min_workers: int = 1, max_workers: int | None = None,
                 autoscaling: dict[str, Any] | None = None, names: AppNames | None = None,
                 ledger_grace_s: float = 10.0,
                 orphan_timeout_s: float | None = None) -> None:
        self.max_queue_len = max_queue_len
        self.max_seqs_per_worker = max_seqs_per_worker
        self.health_interval_s = health_interval_s
        self.report_timeout_s = report_timeout_s
        self._queue = WaitQueue()
        self._queue_reported = -1  # the queue length the metrics last saw
        self.incarnation = uuid.uuid4().hex  # a restarted router is another incarnation
        self._boxes: dict[str, _Box] = {}  # client id -> its uncollected answers
        self._workers: dict[str, WorkerEntry] = {}
        self._feeds: dict[str, asyncio.Task] = {}  # worker id -> its KV event long-poll
        if not isinstance(placement, PlacementConfig):
            placement = PlacementConfig(**(placement or {}))
        self.placement = placement
        self._placer = Placer(placement)
        self.events_wait_s = events_wait_s
        self.ledger = AdmissionLedger()  # admitted tickets: the one writer of the room used
        self._released: OrderedDict[str, None] = OrderedDict()  # releases that beat acquire
        self._pulls: dict[str, tuple[WorkerEntry, int]] = {}  # ticket -> (source, blocks)
        self._monitor: asyncio.Task | None = None
        self.metrics = ClusterMetrics()
        self.pool: WorkerPool | None = None
        self.handed_over = 0  # requests drained workers handed to others at their deadline
        # LoRA adapters requests may name, fleet-wide (-> directory): learnt from the workers'
        # load reports (so a restarted router rebuilds it), changed by load/unload_lora
        self.loras: dict[str, str] | None = None  # None until a worker reported
        self._loras_removed: set[str] = set()  # unloaded: a worker still holding one drops it
        self._lora_syncs: dict[tuple[str, str], asyncio.Task] = {}  # (worker, name) -> push
        self.rebalanced = 0  # requests not yet started moved from a busy worker to an idle one
        self.migrated = 0  # requests draining workers moved out with their KV
        self._pool_args = (worker_spec, min_workers, max_workers or min_workers, autoscaling)
        if worker_spec is not None:  # refuse bad knobs at construction, not at start
            from raysvc.cluster.autoscaler import AutoscalingConfig, ScalingPolicy

            ScalingPolicy(AutoscalingConfig.parse(autoscaling), min_workers,
                          max_workers or min_workers)
        self.names = names
        self.ledger_grace_s = ledger_grace_s
        self.orphan_timeout_s = orphan_timeout_s  # no keepalive for this long: shut down
        self._joining: dict[str, asyncio.Lock] = {}  # worker id -> its joins, one at a time
        self._started = asyncio.Event()  # the pool is up (set at once without a pool)
        if worker_spec is None:
            self._started.set()
        self._keepalive = time.monotonic()
        self._closing = False
        self._owner_token: str | None = None
        self._abandoned: asyncio.Task | None = None  # the owner stopped: stop unless claimed
        self.restarted = names is not None and was_restarted()
        self._rebuilding: asyncio.Task | None = None
        if self.restarted and worker_spec is not None:  # rebuild from the workers, now
            import ray

            me = ray.get_runtime_context().current_actor
            me.start_workers.remote(min_workers)

    def _ensure_rebuilding(self) -> None:
        """A restarted router rebuilds itself at once (the call to itself above); should
        that call be lost with the node it was sent from, the next call to this router
        starts the rebuild instead."""
        if self.restarted and self.pool is None and self._pool_args[0] is not None and \
                self._rebuilding is None:
            self._rebuilding = asyncio.create_task(self.start_workers(self._pool_args[1]))

    # -- the elastic pool --------------------------------------------------------------

    async def start_workers(self, num_workers: int, timeout_s: float = 600.0) -> int:
        """Start the pool with `num_workers` workers; return how many became ready.

        Idempotent: a router whose pool runs answers at once. A router rebuilding itself
        (restarted) first adopts the application's live named workers, then starts only
        what is missing."""
        spec, lo, hi, knobs = self._pool_args
        if spec is None:
            raise RuntimeError("this router was not given a worker_spec")
        if self.pool is not None:
            await asyncio.wait_for(self._started.wait(), timeout_s)
            return self.health()["ready"]
        if self.pool is None:
            import ray

            from raysvc.cluster.launch import draining_nodes, start_worker
            from raysvc.cluster.pool import WorkerPool

            me = ray.get_runtime_context().current_actor
            self.attach_pool(WorkerPool(
                self, lambda worker_id: start_worker(worker_id, spec, me), ray.kill, lo, hi,
                knobs, seats_per_worker=int(spec.engine_kwargs.get("max_num_seqs", 256)),
                draining_nodes=draining_nodes))
        found = await asyncio.to_thread(self.names.workers_alive) if self.names else {}
        if found:
            logger.warning("router: adopting %d live worker(s): %s", len(found),
                           ", ".join(sorted(found)))
        try:
            return await self.pool.start(num_workers, timeout_s, adopt=found)
        finally:
            self._started.set()
            self._fail_queue_if_hopeless()

    def close(self) -> int:
        """Refuse new requests from now on (ShuttingDown: HTTP 503); return how many are
        still in flight (admitted or queued) — the service drains before it stops."""
        self._closing = True
        return len(self.ledger) + len(self._queue)

    def keepalive(self) -> None:
        """The application's owner (the cluster replica) is alive."""
        self._keepalive = time.monotonic()

    def claim(self, token: str) -> None:
        """The cluster replica that now owns this router (a restarted or newer one)."""
        self._owner_token = token
        self._keepalive = time.monotonic()

    async def shutdown(self, token: str | None = None, drain_s: float = 0.0) -> bool:
        """The application is going away: refuse new requests, let those in flight finish
        for up to `drain_s`, stop the pool and every worker. A replica whose router was
        re-adopted by a newer one (`token` no longer the owner's) stops nothing. True if
        stopped."""
        if token is not None and token != self._owner_token:
            return False
        self._closing = True
        deadline = time.monotonic() + drain_s
        while (len(self.ledger) or len(self._queue)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.pool is not None:
            self.pool.stop(kill=True)
        for worker_id in list(self._workers):
            self.remove_worker(worker_id)
        return True

    async def abandon(self, token: str, drain_s: float, grace_s: float,
                      also_stop: list[str] | None = None) -> bool:
        """The owning cluster replica is stopping. Either a config update is replacing it
        (Serve may stop the old replica before it starts the new one) and the new replica
        claims this router within `grace_s`; or the application is being deleted, and
        then, after `grace_s`, this drains for up to `drain_s`, stops every worker, the
        actors named in `also_stop` (the draft pool) and itself. Requests are served all
        the while: an update is no outage. False if a newer replica owns this router."""
        if token != self._owner_token:
            return False
        self._abandoned = asyncio.create_task(
            self._stop_unless_claimed(token, drain_s, grace_s, list(also_stop or [])))
        return True

    async def _stop_unless_claimed(self, token: str, drain_s: float, grace_s: float,
                                   also_stop: list[str]) -> None:
        await asyncio.sleep(grace_s)
        if self._owner_token != token:
            return  # a newer replica (a config update) owns this router now
        logger.warning("router: no cluster replica claimed this router %.0fs after its "
                       "owner stopped: the application is gone; stopping", grace_s)
        await self.shutdown(token, drain_s)
        import ray

        for name in also_stop:
            try:
                ray.kill(self.names.get(name) if self.names else ray.get_actor(name))
            except Exception:  # gone already
                pass
        ray.actor.exit_actor()

    async def retire(self) -> None:
        """Stop everything and end this (detached, restartable) actor for good."""
        await self.shutdown()
        for waiting in self._queue.clear():
            waiting.deliver(NoWorkers("the application was stopped"))
        import ray

        ray.actor.exit_actor()

    def attach_pool(self, pool: WorkerPool) -> None:
        self.pool = pool

    def entry(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def pool_signals(self, now: float, current: int) -> PoolSignals:
        from raysvc.cluster.autoscaler import PoolSignals

        workers = list(self._workers.values())
        queued_blocks = 0
        if workers:
            w = workers[0]
            queued_blocks = sum(w.need(q.num_prompt_tokens, q.n)[0] for q in self._queue)
        default_seats = self.pool.default_seats if self.pool else 256
        return PoolSignals(
            now=now, queued_seqs=sum(q.n for q in self._queue), queued_blocks=queued_blocks,
            running_seqs=sum(w.used_seqs for w in workers),
            used_blocks=sum(w.used_blocks for w in workers),
            seats_per_worker=min((w.max_seqs for w in workers), default=default_seats),
            blocks_per_worker=min((w.kv_blocks_total for w in workers), default=0),
            current=current,
            oldest_wait_s=now - (self._queue.oldest_since() or now))

    def pool_changed(self) -> None:
        """A pool member failed to start: queued requests may have nobody left to wait for."""
        self._fail_queue_if_hopeless()

    # -- membership --------------------------------------------------------------------

    async def add_worker(self, worker_id: str, handle: Any) -> WorkerInfo:
        """Take a worker in (or back): once its engine is up and healthy — a worker whose
        engine failed raises here, and its caller (the pool) replaces it. Joins of one
        worker id run one at a time (a restarted worker and the pool may both ask)."""
        lock = self._joining.setdefault(worker_id, asyncio.Lock())
        async with lock:
            return await self._join(worker_id, handle)

    async def _join(self, worker_id: str, handle: Any) -> WorkerInfo:
        info: WorkerInfo = await _once_up(handle.info)
        max_seqs = min(info.max_num_seqs, self.max_seqs_per_worker or info.max_num_seqs)
        known = self._workers.get(worker_id)
        if known is not None and known.info.pid == info.pid:  # joined already (twice asked)
            return info
        await handle.health.remote()  # raises if its engine failed: never take it in
        running = await handle.requests.remote()  # none, unless this router restarted
        known = self._workers.get(worker_id)
        if known is not None:  # a restarted actor re-joins: its cache starts empty
            self.remove_worker(worker_id)
        index = PrefixIndex(self.placement.max_pending_blocks, self.placement.pending_ttl_s)
        entry = self._workers[worker_id] = WorkerEntry(info, handle, max_seqs, index)
        now = time.monotonic()
        for ticket_id, num_prompt_tokens, n in running:
            if self._released.pop(ticket_id, "absent") is None:
                continue  # its caller released it while we were away
            self.ledger.admit(entry, ticket_id, num_prompt_tokens, n, now)
        self._feeds[worker_id] = asyncio.create_task(self._feed(entry))
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch())
        self._dispatch()
        self._rebalance()  # a joining worker takes its share of the backlog at once
        return info

    def remove_worker(self, worker_id: str) -> bool:
        """Forget a worker; its admitted tickets are dropped (their callers see the worker
        fail). Queued requests wait for the others, or fail with NoWorkers if none is left."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return False
        feed = self._feeds.pop(worker_id, None)
        if feed is not None:
            feed.cancel()
        self.ledger.forget_worker(worker)
        self.metrics.forget_worker(worker_id)
        logger.warning("router: worker %s removed", worker_id)
        self._fail_queue_if_hopeless()
        self._dispatch()
        return True

    def _hopeless(self) -> bool:
        """No worker now, and none coming: waiting would be forever."""
        rebuilding = self.restarted and not self._started.is_set()
        return not self._workers and not rebuilding and not (
            self.pool is not None and self.pool.can_grow())

    def _spec_block_size(self) -> int | None:
        """The workers' block size before any has joined (a rebuild's first requests)."""
        spec = self._pool_args[0]
        return None if spec is None else int(spec.engine_kwargs.get("block_size", 16))

    def _fail_queue_if_hopeless(self) -> None:
        if not self._hopeless():
            return
        for waiting in self._queue.clear():
            waiting.deliver(self._no_workers())

    def _no_workers(self) -> NoWorkers:
        why = "no live worker is left"
        if self.pool is not None and self.pool.last_start_error:
            why += f"; the last worker start failed: {self.pool.last_start_error}"
        return NoWorkers(why)

    async def worker_failed(self, worker_id: str) -> bool:
        """A caller saw `worker_id` fail; remove it if it is really gone. True if removed."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.suspect = True  # no placements while we ask: failovers must not land there
        try:
            await asyncio.wait_for(worker.handle.health.remote(), self.report_timeout_s)
            worker.suspect = False
            self._dispatch()
            return False
        except Exception:  # died, unreachable or unhealthy: stop routing to it
            if self._workers.get(worker_id) is not worker:  # re-joined meanwhile
                return False
            return self.remove_worker(worker_id)

    # -- admission ---------------------------------------------------------------------

    async def exchange(self, client_id: str, acquires: list[AcquireRequest],
                       releases: list[str], wait_s: float = 0.0) -> ExchangeReply:
        """One ingress process's batch: release `releases`, ask tickets for `acquires`, and
        answer with every result this client has not collected yet — at once, or, when
        there is none and `wait_s` > 0, as soon as one comes (a long poll for queued
        requests; at most `wait_s`)."""
        box = self._boxes.get(client_id)
        if box is None:
            box = self._boxes[client_id] = _Box()
        box.seen = time.monotonic()
        for ticket_id in releases:
            self._release(ticket_id)
        for req in acquires:
            self._offer(req, lambda result, t=req.ticket_id: box.put(t, result,
                                                                      self._pulls.pop(t, None)),
                        dispatch=False)
        self._dispatch()  # once for the whole batch
        deadline = time.monotonic() + wait_s
        while not box.results and (left := deadline - time.monotonic()) > 0:
            box.news.clear()  # (a concurrent exchange of this client may take the news)
            try:
                await asyncio.wait_for(box.news.wait(), left)
            except TimeoutError:
                pass
        box.seen = time.monotonic()
        return self._collect(box)

    def _collect(self, box: _Box) -> ExchangeReply:
        reply = ExchangeReply(self.incarnation, box.results, box.handles, self.block_size())
        box.results, box.handles = [], {}
        box.news.clear()
        return reply

    def block_size(self) -> int | None:
        """The workers' block size (what the ingress hashes prompts with); None until
        known (no worker yet and no worker spec)."""
        if self._workers:
            return next(iter(self._workers.values())).block_size
        return self._spec_block_size()

    async def acquire(self, ticket_id: str, num_prompt_tokens: int, n: int = 1,
                      block_hashes: list[bytes] | None = None, retry: bool = False,
                      priority: int = 0, tenant: str = "",
                      avoid: str | None = None, lora: str | None = None) -> Ticket | None:
        """One request's ticket, awaited (the in-process form of `exchange`): wait until a
        worker has room; raise Overloaded if the queue is full.

        With `block_hashes` (the prompt's, from `block_hash.hash_blocks`), placement is
        prefix-aware. A `retry` (a request whose worker died) goes to the head of the
        queue; `avoid` names a worker not to place it on; `lora` the adapter it runs with
        (workers holding it are preferred). None if the ticket was released before this
        call arrived (its caller is gone)."""
        future = asyncio.get_running_loop().create_future()

        def deliver(result: Any) -> None:
            src, blocks = self._pulls.pop(ticket_id, (None, 0))
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            elif result is None:
                future.set_result(None)
            else:
                future.set_result(Ticket(ticket_id, result.worker_id, result.handle,
                                         src.handle if src is not None else None, blocks))

        self._offer(AcquireRequest(ticket_id, num_prompt_tokens, n, list(block_hashes or []),
                                   retry, priority, tenant, avoid, lora), deliver)
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away: leave no trace
            self.release(ticket_id)
            raise

    def _offer(self, req: AcquireRequest, deliver: Callable[[Any], None],
               dispatch: bool = True) -> None:
        """Queue `req` (and admit what fits, unless the caller dispatches once for a whole
        batch); `deliver` gets its answer (the worker's entry, None if it was released
        already, or the exception refusing it), now or later."""
        ticket_id = req.ticket_id
        if self._released.pop(ticket_id, "absent") is None:
            return deliver(None)
        owner = self.ledger.owner(ticket_id)
        if owner is not None:  # asked again (the answer to the first ask was lost)
            return deliver(owner)
        queued = self._queue.get(ticket_id)
        if queued is not None:  # asked again while the first ask still waits
            first = queued.deliver
            queued.deliver = lambda result: (first(result), deliver(result))
            return None
        if self._closing and not req.retry:
            return deliver(ShuttingDown("the service is shutting down; retry on another "
                                        "replica"))
        if not self._started.is_set():  # rebuilding after a restart: queue like any other
            # request (bounded by max_queue_len); the first worker to re-join admits it,
            # without waiting for every adopted worker to be ready
            self._ensure_rebuilding()
        if self._hopeless():
            return deliver(self._no_workers())
        if len(self._queue) >= self.max_queue_len and not req.retry:
            return deliver(Overloaded(f"server overloaded: {len(self._queue)} requests are "
                                      f"waiting"))
        self._queue.push(Waiting(ticket_id, req.num_prompt_tokens, req.n, req.block_hashes,
                                 deliver, time.monotonic(), req.priority, req.tenant,
                                 req.avoid, req.lora), retry=req.retry)
        if dispatch:
            self._dispatch()
        return None

    def release(self, ticket_id: str) -> None:
        """The request is over (finished, aborted, failed): free its room, admit the next."""
        if self._release(ticket_id):
            self._dispatch()

    def _release(self, ticket_id: str) -> bool:
        """`release` without admitting the next; True if room was freed."""
        if self.ledger.release(ticket_id) is not None:
            return True
        waiting = self._queue.remove(ticket_id)
        if waiting is not None:
            waiting.deliver(None)
            return False
        self._released[ticket_id] = None  # acquire has not arrived yet
        while len(self._released) > 4096:
            self._released.popitem(last=False)
        return False

    def _dispatch(self) -> None:
        """Admit queued requests in queue order (`WaitQueue`) while the head fits somewhere."""
        now = time.monotonic()
        everyone = list(self._workers.values())
        while (head := self._queue.head()) is not None:
            workers, avoided = everyone, None
            if head.avoid is not None and any(w.worker_id != head.avoid and not w.draining
                                              for w in workers):
                workers = [w for w in workers if w.worker_id != head.avoid]
                avoided = self._workers.get(head.avoid)  # may still be a pull's source
            fits = [w for w in workers if w.fits(head.num_prompt_tokens, head.n)]
            worker, _ = self._placer.choose(workers, fits, head.hashes, now, head.lora,
                                            avoided)
            if worker is None:
                break
            worker.index.place(head.hashes, now)
            if head.lora is not None:
                worker.loras.add(head.lora)  # it loads it now (until its report says so)
            self._queue.pop_head()
            self.ledger.admit(worker, head.ticket_id, head.num_prompt_tokens, head.n, now)
            worker.requests_routed += 1
            if self._placer.pull is not None:  # the kv fabric: pull the prefix, don't recompute
                self._pulls[head.ticket_id] = self._placer.pull
            head.deliver(worker)
        if len(self._queue) != self._queue_reported:
            self._queue_reported = len(self._queue)
            self.metrics.queue(self._queue_reported)

    def _rebalance(self) -> None:
        """Move requests admitted to a worker but not started there (waiting in its engine)
        to workers with idle room: after a scale-up the new worker takes its share of the
        burst's backlog at once instead of the first worker working through it alone.

        The busy worker hands them over (`LLMWorker.shed`, the drain's hand-over for
        requests without output), and their clients place them again at the head of the
        queue, avoiding that worker. Each worker keeps its fair share of the backlog; the
        counts come from load reports, so one worker sheds at most once per two reports.
        Nothing moves while requests queue here: they take any room first."""
        if len(self._queue):
            return
        active = [w for w in self._workers.values() if not (w.draining or w.suspect)]
        backlog = sum(w.load.waiting for w in active)
        if len(active) < 2 or not backlog:
            return
        share = -(-backlog // len(active))
        room = sum(max(w.max_seqs - w.used_seqs, 0) for w in active if not w.load.waiting)
        now = time.monotonic()
        for w in sorted(active, key=lambda w: -w.load.waiting):
            extra = min(w.load.waiting - share, room)
            if extra <= 0 or now < w.shed_after:
                continue
            room -= extra
            w.shed_after = now + 2 * self.health_interval_s
            asyncio.create_task(self._shed(w, extra))

    async def _shed(self, worker: WorkerEntry, count: int) -> None:
        try:
            moved = await asyncio.wait_for(worker.handle.shed.remote(count),
                                           self.report_timeout_s)
        except Exception as e:  # busy or gone: its backlog stays where it is
            logger.debug("router: shedding %d from %s failed: %r", count, worker.worker_id, e)
            return
        if moved:
            self.rebalanced += moved
            logger.info("router: moved %d request(s) not yet started off %s", moved,
                        worker.worker_id)

    async def drain_worker(self, worker_id: str, timeout_s: float = 600.0,
                           migrate: bool = True) -> bool:
        """Stop placing requests on `worker_id`, move its requests off, then remove it
        (scale-down, upgrade). With `migrate` (live migration) its running requests
        leave at once with their KV and continue on other workers without recomputing
        anything; the rest (n > 1 samples; all of them without `migrate`) may finish
        there until `timeout_s`, then are handed over: their clients continue them
        elsewhere, re-prefilling prompt + output (seamless failover). A worker of the
        pool is also stopped; the pool starts another if demand or min_workers call for
        it. False if unknown."""
        if self.pool is not None and self.pool.state_of(worker_id) == "ready":
            return await self.pool.drain(worker_id, timeout_s, migrate)
        return await self.remove_after_drain(worker_id, timeout_s, migrate)

    async def remove_after_drain(self, worker_id: str, timeout_s: float,
                                 migrate: bool = True) -> bool:
        """`drain_worker` itself: the router's side of draining one worker."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.draining = True
        self._dispatch()  # the queue head may have been waiting for this worker's prefix
        if migrate:
            await self._migrate(worker)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        handed_over = False
        again = loop.time() + 1.0
        while worker.admitted and self._workers.get(worker_id) is worker:
            if migrate and not handed_over and loop.time() > again:
                await self._migrate(worker)  # requests that started there since
                again = loop.time() + 1.0
            if loop.time() > deadline and not handed_over:
                logger.warning("router: drain of %s passed its %gs deadline; handing %d "
                               "request(s) over", worker_id, timeout_s, len(worker.admitted))
                handed_over = True
                try:
                    self.handed_over += await asyncio.wait_for(
                        worker.handle.hand_over.remote(), self.report_timeout_s)
                except Exception as e:  # dead or stuck: its clients fail over anyway
                    logger.warning("router: hand-over on %s failed: %r", worker_id, e)
                    break
                deadline = loop.time() + self.report_timeout_s  # for the clients to leave
            elif handed_over and loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        if migrate:  # the worker lives on until every migrated KV was taken
            await self._migrations_taken(worker, loop.time() + MIGRATION_HOLD_S)
        if self._workers.get(worker_id) is worker:
            self.remove_worker(worker_id)
        return True

    async def _migrate(self, worker: WorkerEntry) -> None:
        try:
            moved, handed = await asyncio.wait_for(
                worker.handle.migrate.remote(MIGRATION_HOLD_S), self.report_timeout_s)
        except Exception as e:  # dead or stuck: its requests fail over or wait the deadline
            logger.warning("router: migrating off %s failed: %r", worker.worker_id, e)
            return
        self.migrated += moved
        self.handed_over += handed
        if moved or handed:
            logger.info("router: %s migrated %d request(s) with their KV, handed %d over",
                        worker.worker_id, moved, handed)

    async def _migrations_taken(self, worker: WorkerEntry, until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            try:
                held = await asyncio.wait_for(worker.handle.migrations_held.remote(),
                                              self.report_timeout_s)
            except Exception:  # gone: nothing more to wait for
                return
            if not held:
                return
            await asyncio.sleep(0.05)

    # -- prefix index ------------------------------------------------------------------

    async def _feed(self, worker: WorkerEntry) -> None:
        """Long-poll one worker's KV events into its index, for as long as it is a member."""
        index = worker.index
        while self._workers.get(worker.worker_id) is worker:
            try:
                reply = await asyncio.wait_for(worker.handle.kv_events.remote(
                    index.epoch, index.step, self.events_wait_s),
                    self.events_wait_s + self.report_timeout_s)
                index.apply(reply)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # dead or busy: the monitor decides; retry shortly
                logger.debug("router: KV events of %s failed: %r", worker.worker_id, e)
                await asyncio.sleep(self.health_interval_s)

    def index_hashes(self, worker_id: str) -> set[bytes]:
        """The confirmed block hashes the router believes `worker_id` holds (for tests)."""
        return set(self._workers[worker_id].index.cached)

    # -- load reports ------------------------------------------------------------------

    async def _watch(self) -> None:
        while self._workers:
            await self.refresh()
            self._rebalance()
            now = time.monotonic()
            for client_id in [c for c, b in self._boxes.items() if now - b.seen > BOX_IDLE_S]:
                del self._boxes[client_id]  # its process is gone
            if self.orphan_timeout_s and (time.monotonic() - self._keepalive
                                          > self.orphan_timeout_s):
                logger.warning("router: no keepalive from the application for %.0fs; its "
                               "owner is gone: shutting the workers down",
                               self.orphan_timeout_s)
                await self.retire()
                return
            await asyncio.sleep(self.health_interval_s)

    def _reconcile(self, worker: WorkerEntry, held: list[str]) -> None:
        """Release tickets admitted to `worker` that it does not hold (their release was
        lost, e.g. sent while this router was restarting), after a grace period that
        covers the moment between a ticket and its submission."""
        lost = self.ledger.reconcile(worker, set(held), time.monotonic(), self.ledger_grace_s)
        for ticket_id in lost:
            logger.warning("router: %s does not hold %s; releasing it", worker.worker_id,
                           ticket_id)
        if lost:
            self._dispatch()

    async def refresh(self) -> None:
        """Pull every worker's load report; drop workers that died or stopped answering."""
        workers = list(self._workers.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(w.handle.load.remote(), self.report_timeout_s) for w in workers),
            return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, WorkerLoad) and result.healthy:
                self.metrics.worker(worker.info.worker_id, result, previous=worker.load)
                worker.load, worker.missed_reports = result, 0
                worker.loras = set(result.loras)
                worker.pull_cost = pull_cost(worker.info, result)
                self._reconcile(worker, result.request_ids)
                self._sync_loras(worker, result.lora_modules)
            elif isinstance(result, TimeoutError):
                # Busy, not dead (a first GPU step may compile kernels for minutes): its
                # report is stale, its ledger still holds.
                worker.missed_reports += 1
            elif self._workers.get(worker.worker_id) is worker:  # not re-joined meanwhile
                # the actor died (or is restarting: it re-joins), or its engine failed
                logger.warning("router: worker %s failed its load report: %r",
                               worker.info.worker_id, result)
                self.remove_worker(worker.info.worker_id)

    # -- LoRA adapters -----------------------------------------------------------------

    def lora_modules(self) -> dict[str, str] | None:
        """The fleet's adapters (name -> directory); None before any worker reported."""
        return None if self.loras is None else dict(self.loras)

    async def load_lora(self, name: str, path: str) -> None:
        """Load an adapter on every worker (a worker that joins later gets it from its first
        load report). ValueError if the name is taken or any worker refuses the directory
        (then no worker keeps it)."""
        if self.loras is not None and name in self.loras:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        workers = list(self._workers.values())
        if not workers:
            raise NoWorkers("no worker to load the adapter on yet")
        results = await asyncio.gather(*(w.handle.add_lora.remote(name, path) for w in workers),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for w, r in zip(workers, results, strict=True):
                if not isinstance(r, BaseException):
                    w.handle.remove_lora.remote(name)
            # a report taken meanwhile may have adopted it from a worker that had it
            self._loras_removed.add(name)
            if self.loras is not None:
                self.loras.pop(name, None)
            cause = getattr(failed[0], "cause", failed[0])
            raise ValueError(str(cause)) from None
        self.loras = {**(self.loras or {}), name: path}
        self._loras_removed.discard(name)

    async def unload_lora(self, name: str) -> None:
        """Stop serving an adapter (KeyError if unknown); requests running with it finish."""
        if self.loras is None or name not in self.loras:
            raise KeyError(name)
        self.loras = {n: p for n, p in self.loras.items() if n != name}
        self._loras_removed.add(name)
        await asyncio.gather(*(w.handle.remove_lora.remote(name)
                               for w in self._workers.values()), return_exceptions=True)

    def _sync_loras(self, worker: WorkerEntry, held: dict[str, str]) -> None:
        """Make a worker's adapters the fleet's: what it lacks is pushed to it, what was
        unloaded is dropped there, and what nobody unloaded is adopted (a router rebuilding
        after a restart, or adapters given at start-up)."""
        if self.loras is None:
            self.loras = {}
        for name, path in held.items():
            if name in self._loras_removed:
                self._push_lora(worker, name, None)
            elif name not in self.loras:
                self.loras[name] = path
        for name, path in self.loras.items():
            if held.get(name) != path:
                self._push_lora(worker, name, path)

    def _push_lora(self, worker: WorkerEntry, name: str, path: str | None) -> None:
        key = (worker.worker_id, name)
        if key in self._lora_syncs:
            return

        async def push() -> None:
            try:
                if path is None:
                    await worker.handle.remove_lora.remote(name)
                else:
                    await worker.handle.add_lora.remote(name, path)
            except Exception as e:
                logger.warning("router: syncing adapter %s on %s failed: %r", name,
                               worker.worker_id, e)
            finally:
                self._lora_syncs.pop(key, None)

        self._lora_syncs[key] = asyncio.create_task(push())

    async def stats(self) -> dict[str, Any]:
        self._ensure_rebuilding()
        await self.refresh()
        n = len(self._workers)
        out = {
            "queue_len": len(self._queue),
            "workers": [w.stats() for w in self._workers.values()],
            "index_size": sum(w.index.size() for w in self._workers.values()),
            "placement": self.placement.policy,
            "target_workers": n, "min_workers": n, "max_workers": n,
            "requests_handed_over": self.handed_over,
            "requests_rebalanced": self.rebalanced,
            "requests_migrated": self.migrated,
        }
        if self.pool is not None:
            out.update(self.pool.stats())
            out["workers"] += self.pool.starting_rows()
        return out

    def health(self) -> dict[str, int]:
        """Workers by state; the service is up while `ready` > 0."""
        ready = sum(1 for w in self._workers.values() if not w.draining)
        starting = 0 if self.pool is None else self.pool.stats()["starting_workers"]
        return {"ready": ready, "draining": len(self._workers) - ready, "starting": starting}

    def workers(self) -> dict[str, WorkerInfo]:
        return {worker_id: w.info for worker_id, w in self._workers.items()}


async def _once_up(method: Any, timeout_s: float = 120.0) -> Any:
    """`method.remote()`, waiting out its actor's restart: a restarted worker asks to
    re-join from its constructor, and until that returns Ray answers calls to it with
    ActorUnavailableError ("the actor is restarting") instead of queueing them."""
    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:  # pragma: no cover - Ray is a dependency
        ActorUnavailableError = ()  # noqa: N806
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await method.remote()
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
