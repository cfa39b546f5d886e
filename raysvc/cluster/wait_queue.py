"""`WaitQueue`: the router's one waiting queue, ordered by priority, fair among tenants.

Which waiting request is admitted next:

1. retries first (a request whose worker died or handed it over was admitted once
   already; it goes back to the head, in the order they came back);
2. then the lowest `priority` value (vLLM's convention: lower is served first);
3. within one priority, tenants take turns (round robin over the tenants that have
   requests waiting, FIFO within a tenant): under overload each tenant gets an equal
   share of admissions, so one tenant's flood delays its own requests, not another's.

A tenant is the OpenAI `user` field ("" when absent: all anonymous requests are one
tenant). Fair shares are counted in requests, as Ray Serve's and vLLM's queues count
them; a tenant's long prompts still wait for room like anyone's.

Lookups and removals by ticket id are O(1) (removal is lazy: a removed entry is skipped
when it reaches the head), so a long queue costs nothing per acquire or release.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, eq=False)
class Waiting:
    """A queued request and how to answer it (`deliver` gets a worker entry's ticket or an
    exception)."""

    ticket_id: str
    num_prompt_tokens: int
    n: int
    hashes: list[bytes]
    deliver: Any  # Callable[[Any], None]
    since: float = 0.0  # monotonic time it was queued
    priority: int = 0
    tenant: str = ""
    avoid: str | None = None
    lora: str | None = None
    removed: bool = False


class WaitQueue:
    def __init__(self) -> None:
        self._retries: deque[Waiting] = deque()
        # priority -> tenant -> that tenant's requests (FIFO); the tenant order is the turn
        self._levels: dict[int, OrderedDict[str, deque[Waiting]]] = {}
        self._by_id: dict[str, Waiting] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Waiting]:
        return iter(list(self._by_id.values()))

    def get(self, ticket_id: str) -> Waiting | None:
        return self._by_id.get(ticket_id)

    def push(self, w: Waiting, retry: bool = False) -> None:
        self._by_id[w.ticket_id] = w
        if retry:
            self._retries.append(w)
            return
        tenants = self._levels.setdefault(w.priority, OrderedDict())
        tenants.setdefault(w.tenant, deque()).append(w)

    def remove(self, ticket_id: str) -> Waiting | None:
        w = self._by_id.pop(ticket_id, None)
        if w is not None:
            w.removed = True
        return w

    def head(self) -> Waiting | None:
        """The request to admit next (None: the queue is empty)."""
        while self._retries:
            if not self._retries[0].removed:
                return self._retries[0]
            self._retries.popleft()
        while self._levels:
            priority = min(self._levels)
            tenants = self._levels[priority]
            while tenants:
                tenant, queue = next(iter(tenants.items()))
                while queue and queue[0].removed:
                    queue.popleft()
                if queue:
                    return queue[0]
                del tenants[tenant]
            del self._levels[priority]
        return None

    def pop_head(self) -> Waiting:
        """Take the head (after `head()` returned it); its tenant's turn passes."""
        w = self.head()
        if w is None:
            raise IndexError("pop from an empty WaitQueue")
        if self._retries and self._retries[0] is w:
            self._retries.popleft()
        else:
            tenants = self._levels[min(self._levels)]
            tenant, queue = next(iter(tenants.items()))
            queue.popleft()
            if queue:
                tenants.move_to_end(tenant)
            else:
                del tenants[tenant]
        del self._by_id[w.ticket_id]
        return w

    def oldest_since(self) -> float | None:
        return min((w.since for w in self._by_id.values()), default=None)

    def clear(self) -> list[Waiting]:
        """Empty the queue; the requests it held (to be answered by the caller)."""
        out = list(self._by_id.values())
        self._retries.clear()
        self._levels.clear()
        self._by_id.clear()
        return out
