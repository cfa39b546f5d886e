"""The router's waiting queue: retries first, then priority (lower first), then tenants
in turn, FIFO within a tenant; removal by ticket id. Checked against a plain reference
model of the same rules (hypothesis drives random pushes, pops and removals)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raysvc.cluster.wait_queue import Waiting, WaitQueue


def _w(ticket_id: str, priority: int = 0, tenant: str = "") -> Waiting:
    return Waiting(ticket_id, 10, 1, [], None, 0.0, priority, tenant)


def _drain(q: WaitQueue) -> list[str]:
    out = []
    while q.head() is not None:
        out.append(q.pop_head().ticket_id)
    return out


def test_a_flooding_tenant_does_not_starve_another():
    q = WaitQueue()
    for i in range(6):
        q.push(_w(f"flood{i}", tenant="a"))
    q.push(_w("b0", tenant="b"))
    q.push(_w("b1", tenant="b"))
    assert _drain(q) == ["flood0", "b0", "flood1", "b1", "flood2", "flood3", "flood4", "flood5"]


def test_priority_then_retries_first():
    q = WaitQueue()
    q.push(_w("low", priority=5))
    q.push(_w("normal"))
    q.push(_w("urgent", priority=-1))
    q.push(_w("retry", priority=9), retry=True)
    assert _drain(q) == ["retry", "urgent", "normal", "low"]


def test_removed_entries_are_skipped_and_counted_out():
    q = WaitQueue()
    for t in "abc":
        q.push(_w(t))
    assert q.remove("a").ticket_id == "a" and q.remove("a") is None
    assert len(q) == 2 and q.get("a") is None and q.get("b") is not None
    assert _drain(q) == ["b", "c"] and len(q) == 0


class _Reference:
    """The rules, written the slow and obvious way."""

    def __init__(self) -> None:
        self.retries: list[str] = []
        self.items: list[tuple[str, int, str]] = []  # arrival order
        self.turns: dict[int, list[str]] = {}  # priority -> tenants in turn order

    def push(self, t: str, priority: int, tenant: str, retry: bool) -> None:
        if retry:
            self.retries.append(t)
            return
        self.items.append((t, priority, tenant))
        turns = self.turns.setdefault(priority, [])
        if tenant not in turns:
            turns.append(tenant)

    def remove(self, t: str) -> None:
        self.retries = [x for x in self.retries if x != t]
        self.items = [x for x in self.items if x[0] != t]

    def pop(self) -> str | None:
        if self.retries:
            return self.retries.pop(0)
        if not self.items:
            return None
        priority = min(p for _, p, _ in self.items)
        turns = self.turns[priority]
        turns[:] = [x for x in turns if any(p == priority and ten == x
                                            for _, p, ten in self.items)]
        tenant = turns[0]
        item = next(x for x in self.items if x[1] == priority and x[2] == tenant)
        self.items.remove(item)
        turns.pop(0)
        if any(p == priority and ten == tenant for _, p, ten in self.items):
            turns.append(tenant)
        return item[0]


ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 2), st.sampled_from("xyz"), st.booleans()),
    st.tuples(st.just("pop")),
    st.tuples(st.just("remove"), st.integers(0, 40))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_matches_the_reference(script):
    q, ref = WaitQueue(), _Reference()
    pushed: list[str] = []
    for op in script:
        if op[0] == "push":
            t = f"t{len(pushed)}"
            pushed.append(t)
            retry = op[3] and op[1] == 0  # some retries
            q.push(_w(t, op[1], op[2]), retry=retry)
            ref.push(t, op[1], op[2], retry)
        elif op[0] == "remove" and op[1] < len(pushed):
            q.remove(pushed[op[1]])
            ref.remove(pushed[op[1]])
        elif op[0] == "pop":
            want = ref.pop()
            got = q.pop_head().ticket_id if q.head() is not None else None
            assert got == want
        assert len(q) == len(ref.retries) + len(ref.items)
    assert _drain(q) == [t for t in iter(ref.pop, None)]
