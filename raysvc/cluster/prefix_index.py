"""The router's copy of each worker's prefix cache, fed by the worker's exact KV events.

Worker side, `KVEventLog` subscribes to the engine's KV events (they fire on the engine's
step thread, hence the lock) and keeps (1) a mirror set of the cached block hashes and
(2) the batches the router has not acknowledged yet. The router long-polls
`LLMWorker.kv_events(epoch, acked_step)`: normally it gets the new batches; after a
restart, a lost reply or an overflowing log it gets a snapshot of the mirror instead, so
the router's copy converges to the engine's set exactly, whatever was lost on the way.

Router side, `PrefixIndex` holds the confirmed hashes plus *pending* ones: prompts the
router just placed on the worker, assumed cached until the events confirm (or a TTL
drops) them, so a burst of one prefix group follows its first request before the worker
has even run it. Memory is bounded: confirmed hashes by the worker's KV pool size (it is
an exact mirror), pending ones by `max_pending`. Matching walks the prompt's hash chain
and stops at the first miss: O(prompt blocks), independent of the cache size.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from raysvc.cluster.messages import KVEventsReply


class KVEventLog:
    """Worker side: the engine's KV events, kept until the router acknowledges them."""

    def __init__(self, max_batches: int = 4096) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        self.max_batches = max_batches
        self._lock = threading.Lock()
        self._mirror: set[bytes] = set()
        self._batches: list[tuple[int, list[tuple[str, list[bytes]]]]] = []
        self._first_kept = 0  # batches after this step are all in _batches
        self._step = 0
        self.on_change: Callable[[], None] | None = None  # called (on the step thread)

    def record(self, batch) -> None:
        """KV event callback (engine thread): `batch` is an engine KVEventBatch."""
        events = [(e.kind, list(e.block_hashes)) for e in batch.events]
        with self._lock:
            for kind, hashes in events:
                if kind == "stored":
                    self._mirror.update(hashes)
                else:
                    self._mirror.difference_update(hashes)
            self._step = batch.step
            self._batches.append((batch.step, events))
            if len(self._batches) > self.max_batches:  # router away: it will get a snapshot
                self._first_kept = self._batches[-1][0]
                self._batches.clear()
        if self.on_change is not None:
            self.on_change()

    def since(self, epoch: str, acked_step: int) -> KVEventsReply:
        with self._lock:
            if epoch != self.epoch or acked_step < self._first_kept:
                return KVEventsReply(self.epoch, self._step, snapshot=set(self._mirror))
            self._batches = [b for b in self._batches if b[0] > acked_step]
            self._first_kept = max(self._first_kept, acked_step)
            return KVEventsReply(self.epoch, self._step, batches=list(self._batches))

    def has_news(self, epoch: str, acked_step: int) -> bool:
        with self._lock:
            return epoch != self.epoch or self._step > acked_step

    def cached(self) -> set[bytes]:
        with self._lock:
            return set(self._mirror)


class PrefixIndex:
    """Router side: which block hashes one worker holds (confirmed) or will (pending)."""

    def __init__(self, max_pending: int = 65536, pending_ttl_s: float = 30.0) -> None:
        self.epoch = ""
        self.step = -1
        self.cached: set[bytes] = set()
        self.pending: OrderedDict[bytes, float] = OrderedDict()  # hash -> expiry time
        self.max_pending = max_pending
        self.pending_ttl_s = pending_ttl_s

    def apply(self, reply: KVEventsReply) -> None:
        if reply.snapshot is not None:
            self.epoch, self.step, self.cached = reply.epoch, reply.step, set(reply.snapshot)
            return
        for step, events in reply.batches:
            if step <= self.step:
                continue  # already applied (a repeated reply)
            for kind, hashes in events:
                if kind == "stored":
                    self.cached.update(hashes)
                    for h in hashes:
                        self.pending.pop(h, None)
                else:
                    self.cached.difference_update(hashes)
        self.step = max(self.step, reply.step)

    def place(self, hashes: list[bytes], now: float | None = None) -> None:
        """The router sent a prompt with these blocks here: count them as cached for now."""
        expiry = (time.monotonic() if now is None else now) + self.pending_ttl_s
        for h in hashes:
            if h not in self.cached:
                self.pending[h] = expiry
                self.pending.move_to_end(h)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    def match(self, hashes: list[bytes], now: float | None = None) -> int:
        """How many leading blocks of `hashes` this worker holds or is about to."""
        now = time.monotonic() if now is None else now
        for i, h in enumerate(hashes):
            if h in self.cached:
                continue
            expiry = self.pending.get(h)
            if expiry is None or expiry < now:
                return i
        return len(hashes)

    def size(self) -> int:
        return len(self.cached) + len(self.pending)
