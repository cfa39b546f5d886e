"""The admission ledger: which worker each admitted ticket runs on, and the room it takes.

The router's one account of admitted work. Each `WorkerEntry` keeps its own totals
(`admitted`, `used_blocks`, `used_seqs`) because placement reads them on every decision,
but only this class writes them, through four verbs:

- `admit`: a ticket takes its blocks and seats on a worker (a queued request placed, or a
  running request found on a worker when a restarted router rebuilds);
- `release`: the request is over; its room is free again;
- `reconcile`: a worker's load report lists what it really holds; tickets it does not
  hold past a grace period (their release was lost) are dropped;
- `forget_worker`: the worker is gone; its tickets are no longer anyone's.

A ticket is owned by the entry it was admitted to, not by a worker id: a restarted worker
re-joins as a new entry, and the old entry's tickets go with `forget_worker`.
"""

from __future__ import annotations

from raysvc.cluster.placement import WorkerEntry


class AdmissionLedger:
    def __init__(self) -> None:
        self._owner: dict[str, WorkerEntry] = {}  # admitted ticket -> its worker's entry
        self._admitted_at: dict[str, float] = {}  # ticket -> when (monotonic)

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, ticket_id: str) -> WorkerEntry | None:
        return self._owner.get(ticket_id)

    def admit(self, entry: WorkerEntry, ticket_id: str, num_prompt_tokens: int, n: int,
              now: float) -> None:
        blocks, seqs = entry.admitted[ticket_id] = entry.need(num_prompt_tokens, n)
        entry.used_blocks += blocks
        entry.used_seqs += seqs
        self._owner[ticket_id] = entry
        self._admitted_at[ticket_id] = now

    def release(self, ticket_id: str) -> WorkerEntry | None:
        """Free the ticket's room; the entry it was on, or None if it was not admitted."""
        entry = self._owner.pop(ticket_id, None)
        self._admitted_at.pop(ticket_id, None)
        if entry is not None:
            self._free(entry, ticket_id)
        return entry

    def reconcile(self, entry: WorkerEntry, holding: set[str], now: float,
                  grace_s: float) -> list[str]:
        """Drop the tickets admitted to `entry` that it does not hold, once older than
        `grace_s` (which covers the moment between a ticket and its submission)."""
        lost = [t for t in entry.admitted if t not in holding
                and now - self._admitted_at.get(t, now) > grace_s]
        for ticket_id in lost:
            self._free(entry, ticket_id)
            if self._owner.get(ticket_id) is entry:
                del self._owner[ticket_id]
                self._admitted_at.pop(ticket_id, None)
        return lost

    def forget_worker(self, entry: WorkerEntry) -> None:
        for ticket_id in entry.admitted:
            if self._owner.get(ticket_id) is entry:
                del self._owner[ticket_id]
                self._admitted_at.pop(ticket_id, None)

    @staticmethod
    def _free(entry: WorkerEntry, ticket_id: str) -> None:
        blocks, seqs = entry.admitted.pop(ticket_id, (0, 0))
        entry.used_blocks -= blocks
        entry.used_seqs -= seqs
