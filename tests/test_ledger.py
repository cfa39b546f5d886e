"""The admission ledger (raysvc/cluster/ledger.py): under any sequence of admit, release,
reconcile and forget_worker, each worker's totals equal the sum of what it holds, and
every admitted ticket has exactly one owner. The reference: totals recomputed from the
tickets themselves."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from raysvc.cluster.ledger import AdmissionLedger
from raysvc.cluster.messages import WorkerInfo
from raysvc.cluster.placement import WorkerEntry
from raysvc.cluster.prefix_index import PrefixIndex


def _entry(worker_id: str) -> WorkerEntry:
    info = WorkerInfo(worker_id, "n0", 1, "cpu", "m", 512, 100, 16, 64, 8)
    return WorkerEntry(info, None, 8, PrefixIndex(16, 1.0))


def _check(ledger: AdmissionLedger, entries: list[WorkerEntry]) -> None:
    owned = 0
    for e in entries:
        assert e.used_blocks == sum(b for b, _ in e.admitted.values())
        assert e.used_seqs == sum(s for _, s in e.admitted.values())
        for t in e.admitted:
            if ledger.owner(t) is e:
                owned += 1
    assert owned == len(ledger)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "release", "reconcile", "forget"]),
                          st.integers(0, 2), st.integers(0, 9), st.integers(1, 100)),
                max_size=60))
def test_totals_always_match_what_each_worker_holds(ops):
    ledger, entries, now = AdmissionLedger(), [_entry(f"w{i}") for i in range(3)], 0.0
    live = list(entries)
    for op, w, t, tokens in ops:
        now += 1.0
        entry, ticket = entries[w], f"t{t}"
        if op == "admit" and entry in live and ledger.owner(ticket) is None:
            ledger.admit(entry, ticket, tokens, 1 + tokens % 3, now)
        elif op == "release":
            ledger.release(ticket)
        elif op == "reconcile" and entry in live:
            held = {x for x in entry.admitted if random.Random(t).random() < 0.5}
            lost = ledger.reconcile(entry, held, now, grace_s=2.0)
            assert not set(lost) & held
        elif op == "forget" and entry in live:
            ledger.forget_worker(entry)
            live.remove(entry)
            entries[w] = _entry(entry.worker_id)  # a restarted worker re-joins anew
            live.append(entries[w])
        _check(ledger, entries)


def test_release_frees_exactly_the_room_taken():
    ledger, e = AdmissionLedger(), _entry("w0")
    ledger.admit(e, "a", 40, 2, 0.0)  # ceil(40 / 16) + 2 blocks, 2 seats
    ledger.admit(e, "b", 16, 1, 0.0)
    assert (e.used_blocks, e.used_seqs, len(ledger)) == (5 + 2, 3, 2)
    assert ledger.release("a") is e and ledger.release("a") is None
    assert (e.used_blocks, e.used_seqs, len(ledger)) == (2, 1, 1)
    assert ledger.reconcile(e, set(), now=1.0, grace_s=5.0) == []  # too young to drop
    assert ledger.reconcile(e, set(), now=10.0, grace_s=5.0) == ["b"]
    assert (e.used_blocks, e.used_seqs, len(ledger)) == (0, 0, 0)
