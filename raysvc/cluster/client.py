"""`ClusterClient`: one request's trip through the cluster, as the ingress makes it.

ticket from the router (through this process's `TicketBatcher`, which batches every
request's acquire and release into few calls) -> submit to the named worker -> read the
request's chunks off this process's channel to that worker -> release the ticket. The
client always releases (finished, aborted, failed or cancelled) and aborts the request on
its worker if it leaves early, so neither the router's ledger nor the worker's KV blocks
leak when an HTTP client disconnects. Cleanup calls are fire-and-forget submissions
(`.remote()` is synchronous), so they run even from a cancelled task.

Seamless failover: when the worker dies (or its engine fails) mid-request, the client
reports it to the router and places the request again, at the head of the queue, with
prompt + the tokens generated so far as its new prompt and `max_tokens` / `min_tokens`
reduced by as many. The caller's stream just continues: no token is lost or repeated, and
greedy output equals an undisturbed run (the KV of the continued prompt is recomputed,
often from the new worker's prefix cache). A request of n > 1 samples that already
produced output continues as one n = 1 request per unfinished sample (their outputs
diverged), merged back under the samples' indices. Limits: a seeded sampled stream
restarts its generator, so it continues validly but not bit-identically; penalties that
count only output tokens (presence, frequency) see the earlier output as prompt; a
structured output's grammar resumes after the earlier output (`continued_output_tokens`).

A draining worker hands its requests over (`StreamChunk.handed_over`): the same
continuation, without reporting the worker as failed or counting an attempt. Live
migration: a running request leaves the draining worker with its KV
(`StreamChunk.migrated`); its continuation's submit names that worker and the request
(`resume`), the new worker takes the KV from it and recomputes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from raysvc.block_hash import hash_blocks
from raysvc.cluster.messages import (
    AcquireRequest,
    HandedOver,
    RequestFailed,
    SeqDelta,
    StreamChunk,
    Ticket,
    WorkerDied,
)
from raysvc.cluster.tickets import TicketBatcher

logger = logging.getLogger(__name__)


class _ChannelReader:
    """This process's end of one worker's output channel: chunks fan out to request queues.

    The channel outlives the request that happened to open it, so it is opened from an
    empty context: inside a Serve replica, a Ray call made in a request's context is that
    request's child task, and Ray cancels children with their parent — one client hanging
    up would otherwise close the channel under every other request sharing it.

    Submissions to the worker are batched like tickets (`tickets.py`): one
    `submit_many` call in flight per channel, carrying every request submitted meanwhile.
    """

    def __init__(self, worker: Any) -> None:
        self.id = f"ch-{uuid.uuid4().hex[:12]}"
        self.worker = worker
        self.queues: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None
        self.task = contextvars.Context().run(asyncio.create_task, self._pump())
        self._submits: list[tuple[tuple, asyncio.Future]] = []
        self._sending = False

    def submit(self, request_id: str, prompt: list[int], params: dict[str, Any],
               priority: int, pull: tuple[Any, list[bytes]] | None = None,
               resume: tuple[Any, str] | None = None) -> asyncio.Future:
        """Start a request on the worker (after it pulled `pull`'s prefix blocks, or took
        a migrated KV named by `resume`, if any); the future fails with what refused it
        (a ValueError for bad params, the engine's failure, the actor's death)."""
        future = asyncio.get_running_loop().create_future()
        item = (request_id, prompt, params, priority)
        if pull is not None or resume is not None:
            item += (pull, resume)
        self._submits.append((item, future))
        if not self._sending:
            self._sending = True
            contextvars.Context().run(asyncio.create_task, self._send())
        return future

    async def _send(self) -> None:
        try:
            while self._submits:
                batch, self._submits = self._submits, []
                try:
                    errors = await self.worker.submit_many.remote(
                        self.id, [item for item, _ in batch])
                except BaseException as e:  # the worker died: every one of them failed
                    errors = [e] * len(batch)
                    if isinstance(e, asyncio.CancelledError):
                        raise
                for (_, future), error in zip(batch, errors, strict=True):
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        finally:
            self._sending = False

    @property
    def open(self) -> bool:
        return self.error is None and not self.task.done()

    async def _pump(self) -> None:
        try:
            async for ref in self.worker.open_channel.remote(self.id):
                for request_id, chunk in await ref:
                    queue = self.queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(chunk)
            raise RuntimeError("worker closed the channel")
        except BaseException as e:  # the worker died (RayActorError) or we are shutting down
            self.error = e
            for queue in self.queues.values():
                queue.put_nowait(e)
            if isinstance(e, asyncio.CancelledError):
                raise


def _take(queue: asyncio.Queue, item: StreamChunk | BaseException) -> StreamChunk | BaseException:
    """`item` merged with every chunk already waiting behind it in `queue`.

    When this process falls behind the workers (a busy ingress), a request's chunks pile
    up here; handing them on as one chunk means one SSE event instead of several, so the
    HTTP path's cost per token shrinks exactly when it matters. An error wins.
    """
    while (not queue.empty() and not isinstance(item, BaseException) and not item.error
           and not item.handed_over and not item.finished):
        nxt = queue.get_nowait()
        if isinstance(nxt, BaseException) or nxt.error or nxt.request_error or nxt.handed_over:
            return nxt
        item = merge_chunks(item, nxt)
    return item


def merge_chunks(a: StreamChunk, b: StreamChunk) -> StreamChunk:
    """One chunk saying what `a` then `b` said (b is the later one)."""
    by_index = {d.index: SeqDelta(d.index, list(d.token_ids),
                                  None if d.logprobs is None else list(d.logprobs),
                                  d.finish_reason, d.stop_reason) for d in a.deltas}
    for d in b.deltas:
        m = by_index.get(d.index)
        if m is None:
            by_index[d.index] = d
            continue
        m.token_ids += d.token_ids
        if d.logprobs is not None:
            m.logprobs = (m.logprobs or []) + d.logprobs
        m.finish_reason, m.stop_reason = d.finish_reason, d.stop_reason
    return StreamChunk(b.num_prompt_tokens, sorted(by_index.values(), key=lambda d: d.index),
                       b.finished, prompt_logprobs=a.prompt_logprobs or b.prompt_logprobs,
                       error=b.error)


class _EngineFailed(RuntimeError):
    """The worker's engine failed mid-request (the actor itself may live on)."""


def _continued(params: dict[str, Any], num_generated: int) -> dict[str, Any]:
    """`params` for the rest of a request that has already produced `num_generated` tokens."""
    if not num_generated:
        return params
    return {**params, "max_tokens": int(params.get("max_tokens", 16)) - num_generated,
            "min_tokens": max(int(params.get("min_tokens", 0)) - num_generated, 0),
            # a grammar resumes where the output stopped, not at its start
            "continued_output_tokens": int(params.get("continued_output_tokens", 0))
            + num_generated,
            "prompt_logprobs": None}  # the caller has the prompt's already


class ClusterClient:
    """`resolve` finds the router again by name after it died for good and was re-created;
    `router_wait_s` bounds how long a request waits for a router that is restarting.
    `block_size` is the workers' (the prompt's blocks are hashed here, for prefix-aware
    placement); without it, it is asked of the router."""

    def __init__(self, router: Any, max_attempts: int = 3,
                 resolve: Callable[[], Any] | None = None, router_wait_s: float = 30.0,
                 stall_check_s: float = 30.0, block_size: int | None = None) -> None:
        self.tickets = TicketBatcher(router, resolve, router_wait_s)
        self.max_attempts = max_attempts
        self.block_size = block_size
        # a stream silent this long asks the router whether its worker is stuck
        self.stall_check_s = stall_check_s
        self._channels: dict[str, _ChannelReader] = {}  # worker id -> channel
        self._live: dict[str, Ticket] = {}  # request id -> the ticket it streams from now

    @property
    def router(self) -> Any:
        """The router's actor handle (re-resolved after it was re-created)."""
        return self.tickets.router

    async def _hashes(self, prompt: list[int], cache_salt: str | None,
                      lora_name: str | None = None) -> list[bytes]:
        """The prompt's block hashes as the workers' prefix caches name them (a hit never
        covers the last prompt token: its logits are needed)."""
        block_size = self.block_size or await self.tickets.fetch_block_size()
        return hash_blocks(prompt[:-1], block_size, cache_salt,
                           lora_name=lora_name) if block_size else []

    def _channel(self, ticket: Ticket) -> _ChannelReader:
        channel = self._channels.get(ticket.worker_id)
        if channel is None or not channel.open:
            channel = self._channels[ticket.worker_id] = _ChannelReader(ticket.worker)
        return channel

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: dict[str, Any], n: int = 1, priority: int = 0,
                       tenant: str = "") -> AsyncIterator[StreamChunk]:
        """Stream one request's chunks; raises Overloaded / NoWorkers / WorkerDied / ValueError.

        `priority` (lower first) and `tenant` (fair shares) order the router's queue and
        the worker's."""
        from ray.exceptions import RayActorError, TaskCancelledError

        outputs: dict[int, list[int]] = {i: [] for i in range(n)}  # tokens streamed per sample
        ended: set[int] = set()  # samples that finished
        produced = False
        failures = 0
        avoid: str | None = None  # the worker that just handed this request over
        resume: tuple[Any, str] | None = None  # (that worker, ticket) holding its KV
        for attempt in itertools.count():
            if produced and n > 1:  # the samples diverged: each goes on as its own request
                async for chunk in self._continue_samples(request_id, prompt_token_ids, params,
                                                          outputs, ended, priority, tenant):
                    yield chunk
                return
            ticket_id = f"{request_id}/{attempt}"
            generated = outputs[0] if n == 1 else []
            prompt = list(prompt_token_ids) + generated
            taking, resume = resume, None  # a migrated KV is offered to one attempt only
            ticket: Ticket | None = None
            channel: _ChannelReader | None = None
            finished = False
            try:
                hashes = await self._hashes(prompt, params.get("cache_salt"),
                                            params.get("lora_name"))
                ticket = await self.tickets.acquire(AcquireRequest(
                    ticket_id, len(prompt), n, hashes, attempt > 0, priority, tenant, avoid,
                    params.get("lora_name")))
                if ticket is None:
                    return
                channel = self._channel(ticket)
                self._live[request_id] = ticket
                queue = channel.queues[ticket_id] = asyncio.Queue()
                try:
                    pull = None
                    if ticket.pull_from is not None and taking is None:
                        pull = (ticket.pull_from, hashes[:ticket.pull_blocks])  # elsewhere
                    await channel.submit(ticket_id, prompt, _continued(params, len(generated)),
                                         priority, pull, taking)
                except Exception as e:
                    if type(getattr(e, "cause", e)).__name__ == "EngineDeadError":
                        raise _EngineFailed(f"worker {ticket.worker_id}: engine failed") from e
                    raise
                while not finished:
                    item = _take(queue, await self._next(queue, ticket))
                    if isinstance(item, BaseException):
                        raise item
                    if item.handed_over:
                        raise HandedOver(f"worker {ticket.worker_id} handed {ticket_id} over",
                                         migrated=item.migrated)
                    if item.request_error:  # its own failure: replaying would repeat it
                        raise RequestFailed(item.request_error)
                    if item.error:
                        raise _EngineFailed(f"worker {ticket.worker_id} failed: {item.error}")
                    produced, finished = True, item.finished
                    for d in item.deltas:
                        outputs[d.index] += d.token_ids
                        if d.finish_reason is not None:
                            ended.add(d.index)
                    item.num_prompt_tokens = len(prompt_token_ids)
                    yield item
                return
            except HandedOver as e:  # drained, or shedding work to a joining worker
                logger.info("%s; continuing it elsewhere", e)
                avoid = ticket.worker_id
                resume = (ticket.worker, ticket_id) if e.migrated else None
            except TaskCancelledError as e:  # the channel was cancelled, not the worker
                if ticket is None:
                    raise
                logger.warning("channel to %s closed during %s: %r; continuing elsewhere",
                               ticket.worker_id, ticket_id, e)
                failures += 1
                if failures >= self.max_attempts:
                    raise WorkerDied(f"request {request_id}: its stream broke {failures} "
                                     f"times; giving up") from e
            except (RayActorError, _EngineFailed) as e:
                if ticket is None:
                    raise
                logger.warning("worker %s failed during %s: %r", ticket.worker_id, ticket_id, e)
                self.router.worker_failed.remote(ticket.worker_id)
                failures += 1
                if failures >= self.max_attempts:
                    raise WorkerDied(f"request {request_id}: {failures} workers died while "
                                     f"serving it; giving up") from e
            finally:
                if ticket is not None and self._live.get(request_id) is ticket:
                    del self._live[request_id]
                if channel is not None:
                    channel.queues.pop(ticket_id, None)
                if ticket is not None and not finished:
                    ticket.worker.abort.remote(ticket_id)
                self.tickets.release(ticket_id)

    async def _next(self, queue: asyncio.Queue, ticket: Ticket):
        """The stream's next item. A request may rightly wait long (queued in its worker's
        engine behind a full batch), so silence alone proves nothing: every stall_check_s
        without a chunk the router checks the worker's health (which fails when its engine
        is stuck in one step), and a worker it drops fails this stream over."""
        if not queue.empty():  # the per-chunk path: no timer when a chunk is waiting
            return queue.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(queue.get(), self.stall_check_s)
            except TimeoutError:
                dropped = await self.router.worker_failed.remote(ticket.worker_id)
                if dropped:
                    raise _EngineFailed(f"worker {ticket.worker_id} sent nothing for "
                                        f"{self.stall_check_s:g}s and failed its health "
                                        f"check (stuck)") from None

    def finish_sample(self, request_id: str, index: int) -> None:
        """Sample `index` of `request_id` is done (the caller found a stop string): end it
        on its worker now, so it stops spending a batch slot and KV blocks while the other
        samples go on. After a failover each sample is its own request: that one ends."""
        ticket = self._live.get(request_id)
        if ticket is not None:
            ticket.worker.finish_sample.remote(ticket.ticket_id, index)
        elif (sub := self._live.get(f"{request_id}.s{index}")) is not None:
            sub.worker.abort.remote(sub.ticket_id)

    async def _continue_samples(self, request_id: str, prompt_token_ids: list[int],
                                params: dict[str, Any], outputs: dict[int, list[int]],
                                ended: set[int], priority: int,
                                tenant: str) -> AsyncIterator[StreamChunk]:
        """The unfinished samples of an n > 1 request whose worker went away, each as an
        n = 1 request of prompt + its tokens so far (its seed, if any, is the one sample
        `index` had: seed + index), their chunks merged back under the samples' indices."""
        async def one(index: int) -> AsyncIterator[StreamChunk]:
            sub = {**params, "n": 1, "prompt_logprobs": None}
            if sub.get("seed") is not None:
                seed = int(sub["seed"]) + index  # as Sequence wraps it
                sub["seed"] = seed - 2 ** 64 if seed >= 2 ** 64 else seed
            sub = _continued(sub, len(outputs[index]))
            async for chunk in self.generate(f"{request_id}.s{index}",
                                             list(prompt_token_ids) + outputs[index], sub,
                                             priority=priority, tenant=tenant):
                for d in chunk.deltas:
                    d.index = index
                yield chunk

        samples = [one(i) for i in sorted(outputs) if i not in ended]
        async for chunk, still_open in merge_streams(samples):
            chunk.num_prompt_tokens = len(prompt_token_ids)
            chunk.finished = still_open == 1 and chunk.finished  # the request's last end
            yield chunk


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[Any, int]]:
    """The items of several async iterators as they come, each with how many of them are
    still open (its own included). An exception in one ends them all; leaving early
    closes them all (aborting their requests)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except BaseException as e:
            queue.put_nowait(e)
            raise

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        still_open = len(tasks)
        while still_open:
            item = await queue.get()
            if item is _END:
                still_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item, still_open
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_END = object()
