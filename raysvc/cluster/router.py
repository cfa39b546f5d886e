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
preemption. Placement is the least loaded worker with room (prefix-aware scoring and
failover come with [router]). Workers join and leave at any time; a monitor polls their
load reports for /cluster/stats and the metrics, and drops a worker that died or whose
engine failed (a slow report is only stale).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from raysvc.cluster.metrics import ClusterMetrics
from raysvc.cluster.protocol import NoWorkers, Overloaded, Ticket, WorkerInfo, WorkerLoad

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiting:
    ticket_id: str
    num_prompt_tokens: int
    n: int
    future: asyncio.Future


@dataclass(slots=True)
class _Worker:
    info: WorkerInfo
    handle: Any
    max_seqs: int
    load: WorkerLoad = field(default_factory=WorkerLoad)
    admitted: dict[str, tuple[int, int]] = field(default_factory=dict)  # ticket -> blocks, seqs
    used_blocks: int = 0
    used_seqs: int = 0
    requests_routed: int = 0
    missed_reports: int = 0

    def need(self, num_prompt_tokens: int, n: int) -> tuple[int, int]:
        """Blocks and seats a request holds here: its prompt's blocks plus one block per sample
        to grow into; capped at the whole worker, so any request fits an idle worker."""
        blocks = -(-num_prompt_tokens // self.info.block_size) + n
        return min(blocks, self.info.kv_blocks_total), min(n, self.max_seqs)

    def has_room(self, blocks: int, seqs: int) -> bool:
        return (self.used_seqs + seqs <= self.max_seqs
                and self.used_blocks + blocks <= self.info.kv_blocks_total)


class Router:
    def __init__(self, max_queue_len: int = 1024, max_seqs_per_worker: int | None = None,
                 health_interval_s: float = 1.0, report_timeout_s: float = 10.0) -> None:
        self.max_queue_len = max_queue_len
        self.max_seqs_per_worker = max_seqs_per_worker
        self.health_interval_s = health_interval_s
        self.report_timeout_s = report_timeout_s
        self._queue: deque[_Waiting] = deque()
        self._workers: dict[str, _Worker] = {}
        self._owner: dict[str, str] = {}  # admitted ticket -> worker id
        self._released: OrderedDict[str, None] = OrderedDict()  # releases that beat acquire
        self._monitor: asyncio.Task | None = None
        self._metrics = ClusterMetrics()

    # -- membership --------------------------------------------------------------------

    async def add_worker(self, worker_id: str, handle: Any) -> WorkerInfo:
        info: WorkerInfo = await handle.info.remote()
        max_seqs = min(info.max_num_seqs, self.max_seqs_per_worker or info.max_num_seqs)
        self._workers[worker_id] = _Worker(info, handle, max_seqs)
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
            return self.remove_worker(worker_id)

    # -- admission ---------------------------------------------------------------------

    async def acquire(self, ticket_id: str, num_prompt_tokens: int, n: int = 1) -> Ticket | None:
        """Wait until a worker has room for the request; raise Overloaded if the queue is full.

        None if the ticket was released before this call arrived (its caller is gone).
        """
        if self._released.pop(ticket_id, "absent") is None:
            return None
        if not self._workers:
            raise NoWorkers("no worker is registered")
        if len(self._queue) >= self.max_queue_len:
            raise Overloaded(f"server overloaded: {len(self._queue)} requests are waiting")
        waiting = _Waiting(ticket_id, num_prompt_tokens, n,
                           asyncio.get_running_loop().create_future())
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
                blocks, seqs = worker.admitted.pop(ticket_id)
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
            worker = self._place(head)
            if worker is None:
                break
            self._queue.popleft()
            blocks, seqs = worker.need(head.num_prompt_tokens, head.n)
            worker.admitted[head.ticket_id] = (blocks, seqs)
            worker.used_blocks += blocks
            worker.used_seqs += seqs
            worker.requests_routed += 1
            self._owner[head.ticket_id] = worker.info.worker_id
            head.future.set_result(Ticket(head.ticket_id, worker.info.worker_id, worker.handle))
        self._metrics.queue(len(self._queue))

    def _place(self, request: _Waiting) -> _Worker | None:
        """Least loaded worker with room: fewest seats used, then fewest blocks, then fewest
        requests routed so far (spreads an idle cluster's first requests)."""
        best, best_key = None, None
        for worker in self._workers.values():
            if not worker.has_room(*worker.need(request.num_prompt_tokens, request.n)):
                continue
            key = (worker.used_seqs / worker.max_seqs,
                   worker.used_blocks / worker.info.kv_blocks_total, worker.requests_routed)
            if best_key is None or key < best_key:
                best, best_key = worker, key
        return best

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
                worker.load, worker.missed_reports = result, 0
                self._metrics.worker(worker.info.worker_id, result)
            elif isinstance(result, TimeoutError):
                # Busy, not dead (a first GPU step may compile kernels for minutes): its
                # report is stale, its ledger still holds.
                worker.missed_reports += 1
            else:  # the actor died, or its engine failed
                logger.warning("router: worker %s failed its load report: %r",
                               worker.info.worker_id, result)
                self.remove_worker(worker.info.worker_id)

    async def stats(self) -> dict[str, Any]:
        await self.refresh()
        return {
            "queue_len": len(self._queue),
            "workers": [{
                "worker_id": w.info.worker_id, "node_id": w.info.node_id, "pid": w.info.pid,
                "device": w.info.device, "running": w.load.running, "waiting": w.load.waiting,
                "kv_blocks_free": w.load.kv_blocks_free,
                "kv_blocks_total": w.load.kv_blocks_total,
                "tokens_in_flight": w.load.tokens_in_flight,
                "requests_in_flight": w.load.requests_in_flight,
                "requests_admitted": len(w.admitted), "requests_routed": w.requests_routed,
                "prefix_cache_hits": w.load.prefix_cache_hits,
                "prefix_cache_queries": w.load.prefix_cache_queries,
                "num_preemptions": w.load.num_preemptions,
                "num_generated_tokens": w.load.num_generated_tokens,
            } for w in self._workers.values()],
        }

    def workers(self) -> dict[str, WorkerInfo]:
        return {worker_id: w.info for worker_id, w in self._workers.items()}
