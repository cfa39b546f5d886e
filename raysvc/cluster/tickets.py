"""`TicketBatcher`: one ingress process's acquires and releases, sent to the router in batches.

Why: a Ray actor call costs the router's one event loop far more than deciding where a
request goes (task submission, (de)serialisation, an asyncio task per call). With two
calls per request (acquire, release) the router capped the cluster at ~600 admissions/s
on a 2-core machine. Here each process keeps at most one `Router.exchange` call in
flight; whatever acquires and releases its requests make while that call travels go in
the next one. This is Nagle's algorithm without a timer: under light load a call carries
one item and adds no delay, under heavy load the calls grow while their number stays
at one per round trip, so the router's cost per request falls as load rises. The ledger
stays whole in one place, so placement stays exact and admission never overcommits.

Answers: an admitted ticket comes back in the reply of the call that carried it; one the
router had to queue comes back in a later reply. While it waits for queued tickets, the
batcher keeps a second call open, a long poll (`exchange` with nothing to send and
`wait_s`), so a queued request is answered as soon as it is admitted.

Recovery: a failed call puts its items back, and they go again once the router answers
(waiting out a restart for up to `router_wait_s`, re-resolving a re-created router by
name). A reply from a new router incarnation means the queue we were waiting in died
with the old one: every ticket still waited for is asked for again (acquire is
idempotent by ticket id; tickets already admitted are rebuilt from the workers).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from raysvc.cluster.messages import AcquireRequest, ExchangeReply, RouterUnavailable, Ticket

logger = logging.getLogger(__name__)

POLL_S = 1.0  # a long poll's longest wait (then it is renewed)


class TicketBatcher:
    def __init__(self, router: Any, resolve: Callable[[], Any] | None = None,
                 router_wait_s: float = 30.0) -> None:
        self.router = router
        self.resolve = resolve
        self.router_wait_s = router_wait_s
        self.client_id = f"ingress-{uuid.uuid4().hex[:12]}"
        self.block_size: int | None = None  # the workers', learnt from the router
        self.calls = 0  # exchange calls made (the batching's measure: requests per call)
        self._pending: dict[str, tuple[AcquireRequest, asyncio.Future]] = {}
        self._unsent: list[AcquireRequest] = []
        self._releases: list[str] = []
        self._handles: dict[str, Any] = {}  # worker id -> actor handle
        self._incarnation: str | None = None
        self._failing_since: float | None = None
        self._wake: asyncio.Event | None = None
        self._waiting: asyncio.Event | None = None  # some sent acquire is unanswered
        self._tasks: list[asyncio.Task] = []

    # -- what a request does -----------------------------------------------------------

    async def acquire(self, req: AcquireRequest) -> Ticket | None:
        """The request's ticket once the router admits it (None if it was released first);
        raises what the router refused it with, or RouterUnavailable."""
        self._start()
        future = asyncio.get_running_loop().create_future()
        self._pending[req.ticket_id] = (req, future)
        self._unsent.append(req)
        self._wake.set()
        return await future

    def release(self, ticket_id: str) -> None:
        """The request is over (or left while waiting): free its ticket. Never blocks; safe
        from a cancelled task."""
        pending = self._pending.pop(ticket_id, None)
        if pending is not None and not pending[1].done():
            pending[1].cancel()
        self._releases.append(ticket_id)
        if self._wake is not None:
            self._wake.set()

    async def fetch_block_size(self) -> int | None:
        """The workers' block size, asked once (a reply carries it; this asks if none came)."""
        if self.block_size is None:
            self._start()
            self._wake.set()  # an empty exchange brings it
            for _ in range(50):
                if self.block_size is not None:
                    break
                await asyncio.sleep(0.02)
        return self.block_size

    # -- the two calls -----------------------------------------------------------------

    def _start(self) -> None:
        if self._tasks and not any(t.done() for t in self._tasks):
            return
        for task in self._tasks:
            task.cancel()
        self._wake, self._waiting = asyncio.Event(), asyncio.Event()
        # from an empty context: inside a Serve replica, a Ray call made in a request's
        # context is that request's child, cancelled with it; these calls serve everyone
        ctx = contextvars.Context()
        self._tasks = [ctx.run(asyncio.create_task, self._send_loop()),
                       ctx.run(asyncio.create_task, self._poll_loop())]

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            acquires = [r for r in self._unsent if r.ticket_id in self._pending]
            releases, self._unsent, self._releases = self._releases, [], []
            reply = await self._call(acquires, releases, 0.0)
            if reply is None:  # the router is away: send them again
                self._unsent[:0] = acquires
                self._releases[:0] = releases
                self._wake.set()
                continue
            self._waiting.set()  # their answers may come later (queued)

    async def _poll_loop(self) -> None:
        while True:
            if not self._pending:
                self._waiting.clear()
                await self._waiting.wait()
                continue
            if await self._call([], [], POLL_S) is None:
                continue

    async def _call(self, acquires: list[AcquireRequest], releases: list[str],
                    wait_s: float) -> ExchangeReply | None:
        """One exchange; None if the router did not answer (retried by the caller after a
        pause; past router_wait_s every waiting request fails with RouterUnavailable)."""
        from ray.exceptions import ActorDiedError, RayActorError

        try:
            self.calls += 1
            reply = await self.router.exchange.remote(self.client_id, acquires, releases,
                                                      wait_s)
        except RayActorError as e:  # restarting (ActorUnavailableError) or dead
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            if now - self._failing_since > self.router_wait_s:
                self._fail_all(RouterUnavailable(
                    f"the router did not answer for {self.router_wait_s:g}s "
                    f"({type(e).__name__})"))
            if isinstance(e, ActorDiedError) and self.resolve is not None:
                try:
                    self.router = await asyncio.to_thread(self.resolve)
                except ValueError:  # not re-created yet
                    pass
            await asyncio.sleep(min(0.05 * 2 ** min(int(now - self._failing_since), 4), 1.0))
            return None
        self._failing_since = None
        self._deliver(reply)
        return reply

    def _deliver(self, reply: ExchangeReply) -> None:
        if reply.block_size is not None:
            self.block_size = reply.block_size
        self._handles.update(reply.handles)
        if self._incarnation is not None and reply.incarnation != self._incarnation:
            # a new router: every ticket still waited for is asked for again
            logger.warning("ingress: the router restarted; asking again for %d ticket(s)",
                           len(self._pending))
            answered = {t for t, _ in reply.results}
            self._unsent = [r for t, (r, _) in self._pending.items() if t not in answered]
            self._wake.set()
        self._incarnation = reply.incarnation
        for ticket_id, result in reply.results:
            pending = self._pending.pop(ticket_id, None)
            if pending is None or pending[1].done():
                continue  # released meanwhile (its release is on its way) or answered
            future = pending[1]
            if isinstance(result, BaseException):
                future.set_exception(result)
            elif result is None:
                future.set_result(None)
            elif isinstance(result, tuple):  # (worker, pull source, blocks): the kv fabric
                worker, source, blocks = result
                future.set_result(Ticket(ticket_id, worker, self._handles[worker],
                                         self._handles[source], blocks))
            else:
                future.set_result(Ticket(ticket_id, result, self._handles[result]))

    def _fail_all(self, error: BaseException) -> None:
        pending, self._pending, self._unsent = self._pending, {}, []
        for _, future in pending.values():
            if not future.done():
                future.set_exception(error)
