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
placing on one and removes it once its requests are done. A monitor polls load reports for
/cluster/stats and the metrics, and drops a worker that died or whose engine failed (a
slow report is only stale).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from raysvc.block_hash import hash_blocks
from raysvc.cluster.metrics import ClusterMetrics
from raysvc.cluster.placement import PlacementConfig, Placer, WorkerEntry
from raysvc.cluster.prefix_index import PrefixIndex
from raysvc.cluster.protocol import NoWorkers, Overloaded, Ticket, WorkerInfo, WorkerLoad

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiting:
    ticket_id: str
    num_prompt_tokens: int
    n: int
    future: asyncio.Future
    hashes: list[bytes]


class Router:
    def __init__(self, max_queue_len: int = 1024, max_seqs_per_worker: int | None = None,
                 health_interval_s: float = 1.0, report_timeout_s: float = 10.0,
                 placement: PlacementConfig | dict[str, Any] | None = None,
                 events_wait_s: float = 1.0) -> None:
        self.max_queue_len = max_queue_len
        self.max_seqs_per_worker = max_seqs_per_worker
        self.health_interval_s = health_interval_s
        self.report_timeout_s = report_timeout_s
        self._queue: deque[_Waiting] = deque()
        self._workers: dict[str, WorkerEntry] = {}
        self._feeds: dict[str, asyncio.Task] = {}  # worker id -> its KV event long-poll
        if not isinstance(placement, PlacementConfig):
            placement = PlacementConfig(**(placement or {}))
        self.placement = placement
        self._placer = Placer(placement)
        self.events_wait_s = events_wait_s
        self._owner: dict[str, str] = {}  # admitted ticket -> worker id
        self._released: OrderedDict[str, None] = OrderedDict()  # releases that beat acquire
        self._monitor: asyncio.Task | None = None
        self._metrics = ClusterMetrics()

    # -- membership --------------------------------------------------------------------

    async def add_worker(self, worker_id: str, handle: Any) -> WorkerInfo:
        info: WorkerInfo = await handle.info.remote()
        max_seqs = min(info.max_num_seqs, self.max_seqs_per_worker or info.max_num_seqs)
        if worker_id in self._workers:  # a restarted actor re-joins: its cache starts empty
            self.remove_worker(worker_id)
        index = PrefixIndex(self.placement.max_pending_blocks, self.placement.pending_ttl_s)
        entry = self._workers[worker_id] = WorkerEntry(info, handle, max_seqs, index)
        self._feeds[worker_id] = asyncio.create_task(self._feed(entry))
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch())
        self._dispatch()
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
        for ticket_id in worker.admitted:
            self._owner.pop(ticket_id, None)
        self._metrics.forget_worker(worker_id)
        logger.warning("router: worker %s removed", worker_id)
        if not self._workers:
            while self._queue:
                waiting = self._queue.popleft()
                if not waiting.future.done():
                    waiting.future.set_exception(NoWorkers("no live worker is left"))
        self._dispatch()
        return True

    async def worker_failed(self, worker_id: str) -> bool:
        """A caller saw `worker_id` fail; remove it if it is really gone. True if removed."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        try:
            await asyncio.wait_for(worker.handle.health.remote(), self.report_timeout_s)
            return False
        except Exception:  # died, unreachable or unhealthy: stop routing to it
            if self._workers.get(worker_id) is not worker:  # re-joined meanwhile
                return False
            return self.remove_worker(worker_id)

    # -- admission ---------------------------------------------------------------------

    async def acquire(self, ticket_id: str, num_prompt_tokens: int, n: int = 1,
                      prompt_token_ids: list[int] | None = None,
                      cache_salt: str | None = None, retry: bool = False) -> Ticket | None:
        """Wait until a worker has room for the request; raise Overloaded if the queue is full.

        With `prompt_token_ids` (and the request's `cache_salt`), placement is prefix-aware.
        A `retry` (a request whose worker died) goes to the head of the queue.

        None if the ticket was released before this call arrived (its caller is gone).
        """
        if self._released.pop(ticket_id, "absent") is None:
            return None
        if not self._workers:
            raise NoWorkers("no worker is registered")
        if len(self._queue) >= self.max_queue_len and not retry:
            raise Overloaded(f"server overloaded: {len(self._queue)} requests are waiting")
        hashes: list[bytes] = []
        if prompt_token_ids:
            block_size = next(iter(self._workers.values())).block_size
            # a hit never covers the last prompt token: its logits are needed
            hashes = hash_blocks(prompt_token_ids[:-1], block_size, cache_salt)
        waiting = _Waiting(ticket_id, num_prompt_tokens, n,
                           asyncio.get_running_loop().create_future(), hashes)
        if retry:
            self._queue.appendleft(waiting)
        else:
            self._queue.append(waiting)
        self._dispatch()
        try:
            return await waiting.future
        except asyncio.CancelledError:  # the caller went away: leave no trace
            self.release(ticket_id)
            raise

    def release(self, ticket_id: str) -> None:
        """The request is over (finished, aborted, failed): free its room, admit the next."""
        worker_id = self._owner.pop(ticket_id, None)
        if worker_id is not None:
            worker = self._workers.get(worker_id)
            if worker is not None:
                blocks, seqs = worker.admitted.pop(ticket_id, (0, 0))
                worker.used_blocks -= blocks
                worker.used_seqs -= seqs
            self._dispatch()
            return
        for waiting in self._queue:
            if waiting.ticket_id == ticket_id:
                self._queue.remove(waiting)
                if not waiting.future.done():
                    waiting.future.cancel()
                return
        self._released[ticket_id] = None  # acquire has not arrived yet
        while len(self._released) > 4096:
            self._released.popitem(last=False)

    def _dispatch(self) -> None:
        """Admit queued requests in FCFS order while the head of the queue fits somewhere."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
                continue
            workers = list(self._workers.values())
            fits = [w for w in workers if w.has_room(*w.need(head.num_prompt_tokens, head.n))]
            worker, _ = self._placer.choose(workers, fits, head.hashes)
            if worker is None:
                break
            worker.index.place(head.hashes)
            self._queue.popleft()
            blocks, seqs = worker.need(head.num_prompt_tokens, head.n)
            worker.admitted[head.ticket_id] = (blocks, seqs)
            worker.used_blocks += blocks
            worker.used_seqs += seqs
            worker.requests_routed += 1
            self._owner[head.ticket_id] = worker.info.worker_id
            head.future.set_result(Ticket(head.ticket_id, worker.info.worker_id, worker.handle))
        self._metrics.queue(len(self._queue))

    async def drain_worker(self, worker_id: str, timeout_s: float = 600.0) -> bool:
        """Stop placing requests on `worker_id`, wait until its admitted ones are released,
        then remove it (scale-down, upgrade). False if unknown; TimeoutError if still busy."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while worker.admitted and self._workers.get(worker_id) is worker:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"worker {worker_id} still holds {len(worker.admitted)} "
                                   f"requests after {timeout_s}s")
            await asyncio.sleep(0.05)
        if self._workers.get(worker_id) is worker:
            self.remove_worker(worker_id)
        return True

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
            await asyncio.sleep(self.health_interval_s)

    async def refresh(self) -> None:
        """Pull every worker's load report; drop workers that died or stopped answering."""
        workers = list(self._workers.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(w.handle.load.remote(), self.report_timeout_s) for w in workers),
            return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, WorkerLoad) and result.healthy:
                self._metrics.worker(worker.info.worker_id, result, previous=worker.load)
                worker.load, worker.missed_reports = result, 0
            elif isinstance(result, TimeoutError):
                # Busy, not dead (a first GPU step may compile kernels for minutes): its
                # report is stale, its ledger still holds.
                worker.missed_reports += 1
            elif self._workers.get(worker.worker_id) is worker:  # not re-joined meanwhile
                # the actor died (or is restarting: it re-joins), or its engine failed
                logger.warning("router: worker %s failed its load report: %r",
                               worker.info.worker_id, result)
                self.remove_worker(worker.info.worker_id)

    async def stats(self) -> dict[str, Any]:
        await self.refresh()
        return {
            "queue_len": len(self._queue),
            "workers": [w.stats() for w in self._workers.values()],
            "index_size": sum(w.index.size() for w in self._workers.values()),
            "placement": self.placement.policy,
        }

    def workers(self) -> dict[str, WorkerInfo]:
        return {worker_id: w.info for worker_id, w in self._workers.items()}
