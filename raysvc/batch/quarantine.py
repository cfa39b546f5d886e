"""Rows that kill their engine: found by isolation, answered with an error, never retried
forever.

An engine whose step loop fails cannot tell which request broke it (the error came from
the batch-wide forward pass, or from a crash in native code). So the stage that owns it
reports the rows that were in flight and exits; Ray Data restarts the actor and runs the
batch again. Without more, a poison row would repeat that forever. With the ledger:

- a row in flight at an engine failure becomes a **suspect** (one strike);
- a suspect runs **alone** in its engine (an exclusive turn: the rows in flight drain
  first, none start beside it), so a suspect is never condemned for another row's fault;
- a suspect whose engine fails while it runs alone is **condemned**: from then on it is
  answered at once with an error line, and the job completes.

The ledger is a small Ray actor owned by the job (state survives the stage actors it
outlives); `Isolation` is the per-stage shared/exclusive turn.
"""

from __future__ import annotations

import asyncio
import contextlib


class RowLedger:
    """Ray actor: strikes per row key (a custom_id, or a prompt row's digest)."""

    def __init__(self) -> None:
        self.suspects: set[str] = set()
        self.condemned: dict[str, str] = {}  # key -> the engine error that condemned it

    def status(self, keys: list[str]) -> dict[str, str]:
        """"condemned" / "suspect" for the keys that are; the others are clean."""
        found = {k: "suspect" for k in keys if k in self.suspects}
        found.update({k: "condemned" for k in keys if k in self.condemned})
        return found

    def engine_failed(self, in_flight: list[str], alone: str | None, error: str) -> None:
        if alone is not None:
            self.condemned[alone] = error
            self.suspects.discard(alone)
        else:
            self.suspects.update(k for k in in_flight if k not in self.condemned)

    def reason(self, key: str) -> str:
        return self.condemned.get(key, "")


class Isolation:
    """Shared turns for clean rows, exclusive turns for suspects (writer-preferring, so a
    suspect is not starved by a stream of clean rows)."""

    def __init__(self) -> None:
        self._shared = 0
        self._alone: str | None = None
        self._waiting_alone = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def turn(self, key: str, suspect: bool):
        async with self._changed:
            if suspect:
                self._waiting_alone += 1
                try:
                    await self._changed.wait_for(
                        lambda: self._alone is None and self._shared == 0)
                finally:
                    self._waiting_alone -= 1
                self._alone = key
            else:
                await self._changed.wait_for(
                    lambda: self._alone is None and not self._waiting_alone)
                self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                if suspect:
                    self._alone = None
                else:
                    self._shared -= 1
                self._changed.notify_all()
