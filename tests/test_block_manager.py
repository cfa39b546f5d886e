"""Property-based tests: random admit (with prefix hits) / append / fork / free sequences
keep the block manager's books honest.

The oracle is a plain recount: every block's reference count equals the number of live
sequences whose block table holds it; free blocks are exactly those with count 0; the
prefix-cache map and the block hashes agree; replaying the KV events gives the cached set.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from raysvc.block_hash import hash_blocks
from raysvc.engine.block_manager import BlockManager, cdiv
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.sequence import Request, Sequence

NUM_BLOCKS, BLOCK_SIZE = 24, 8

# tokens from a tiny alphabet, in runs, so that prompts often share prefixes
prompts = st.lists(st.sampled_from([7, 8]), min_size=1, max_size=6).map(
    lambda runs: [t for r in runs for t in [r] * 9])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("new"), prompts, st.sampled_from([None, "tenant-b"])),
        st.tuples(st.just("append"), st.integers(0, 7), st.integers(1, 20)),
        st.tuples(st.just("fork"), st.integers(0, 7)),
        st.tuples(st.just("free"), st.integers(0, 7)),
    ),
    max_size=60,
)


def check(bm: BlockManager, live: list[Sequence], replayed: set[bytes]) -> None:
    held = Counter(b for s in live for b in s.block_table)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == held.get(block, 0)
    assert sorted(bm.free_queue) == [b for b in range(bm.num_blocks) if not held.get(b)]
    for h, block in bm.cached.items():
        assert bm.block_hash[block] == h
    assert sum(h is not None for h in bm.block_hash) == len(bm.cached)
    assert bm.num_cached_free == sum(bm.block_hash[b] is not None for b in bm.free_queue)
    assert replayed == set(bm.cached)
    for s in live:
        assert len(s.block_table) == cdiv(s.num_computed_tokens, BLOCK_SIZE)
        assert len(set(s.block_table)) == len(s.block_table)
        # a cached block holds exactly the prefix its hash names
        full = hash_blocks(s.token_ids, BLOCK_SIZE, s.request.params.cache_salt)
        for i, block in enumerate(s.block_table[: s.num_computed_tokens // BLOCK_SIZE]):
            assert bm.block_hash[block] in (None, full[i])


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_keep_counts_consistent(operations):
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    live: list[Sequence] = []
    replayed: set[bytes] = set()

    def replay() -> None:
        for event in bm.drain_events():
            if event.kind == "stored":
                assert not replayed & set(event.block_hashes)
                replayed.update(event.block_hashes)
            else:
                assert set(event.block_hashes) <= replayed
                replayed.difference_update(event.block_hashes)

    for op in operations:
        if op[0] == "new":
            seq = Request("r", None, op[1], SamplingParams(cache_salt=op[2]), ()).seqs[0]
            cached = bm.find_cached_prefix(seq)
            assert len(cached) * BLOCK_SIZE < seq.num_tokens  # the last token is computed
            n = seq.num_tokens - len(cached) * BLOCK_SIZE
            free_before = bm.num_free_blocks
            if bm.allocate_slots(seq, n, cached=cached) is not None:
                assert seq.num_computed_tokens == len(cached) * BLOCK_SIZE
                seq.num_computed_tokens += n
                bm.cache_full_blocks(seq)
                assert bm.num_free_blocks >= 0 and free_before >= bm.num_free_blocks
                live.append(seq)
        elif live and op[0] == "append":
            seq = live[op[1] % len(live)]
            free_before = bm.num_free_blocks
            shared = seq.num_computed_tokens // BLOCK_SIZE < len(seq.block_table) and \
                bm.ref_counts[seq.block_table[seq.num_computed_tokens // BLOCK_SIZE]] > 1
            needed = cdiv(seq.num_computed_tokens + op[2], BLOCK_SIZE) - len(seq.block_table) \
                + shared
            copies = bm.allocate_slots(seq, op[2])
            if copies is not None:
                seq.token_ids += [9] * op[2]
                seq.num_computed_tokens += op[2]
                bm.cache_full_blocks(seq)
                assert len(copies) <= 1  # copy-on-write replaces at most one shared block
                assert bm.num_free_blocks == free_before - needed
            else:
                assert needed > free_before and bm.num_free_blocks == free_before
        elif live and op[0] == "fork":
            parent = live[op[1] % len(live)]
            child = Sequence(parent.request, 1, parent=parent)
            bm.fork(parent, child)
            live.append(child)
        elif live and op[0] == "free":
            seq = live.pop(op[1] % len(live))
            bm.free(seq)
            assert seq.block_table == []
        replay()
        check(bm, live, replayed)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == NUM_BLOCKS
    assert sum(bm.ref_counts) == 0
    assert bm.num_cached_free == len(bm.cached)


steps = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(0, 5),
                           st.integers(0, 5)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(prompts, steps)
def test_allocate_slots_fits_or_changes_nothing_and_rollback_restores(prompt, plan):
    """Speculative steps: `allocate_slots` with k lookahead proposals gives exactly the
    blocks the new and proposed tokens need, or None and leaves every book as it was;
    `truncate` after verification gives back the blocks of rejected proposals; the null
    block (index num_blocks) is never handed out."""
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    other = Request("o", None, prompt, SamplingParams(), ()).seqs[0]
    seq = Request("s", None, list(prompt), SamplingParams(), ()).seqs[0]
    assert bm.allocate_slots(other, other.num_tokens) is not None
    other.num_computed_tokens = other.num_tokens
    bm.cache_full_blocks(other)
    cached = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(cached) * BLOCK_SIZE
    assert bm.allocate_slots(seq, n, cached=cached) is not None
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    live = [other, seq]
    for filler, new, k, accepted in plan:
        for _ in range(filler):  # other sequences take blocks, so that some steps do not fit
            s = Request("f", None, [3] * BLOCK_SIZE, SamplingParams(), ()).seqs[0]
            if bm.allocate_slots(s, BLOCK_SIZE) is not None:
                s.num_computed_tokens = BLOCK_SIZE
                live.append(s)
        books = (list(bm.ref_counts), list(bm.free_queue), list(seq.block_table))
        copies = bm.allocate_slots(seq, new, num_lookahead_tokens=k)
        if copies is None:
            assert (list(bm.ref_counts), list(bm.free_queue), list(seq.block_table)) == books
            if len(live) > 2:
                bm.free(live.pop())
            continue
        assert len(seq.block_table) == cdiv(seq.num_computed_tokens + new + k, BLOCK_SIZE)
        assert all(0 <= b < NUM_BLOCKS for b in seq.block_table)  # never the null block
        seq.token_ids += [9] * new
        seq.num_computed_tokens += new + min(accepted, k)  # verified: the rest rolls back
        seq.token_ids += [9] * min(accepted, k)
        bm.truncate(seq)
        assert len(seq.block_table) == cdiv(seq.num_computed_tokens, BLOCK_SIZE)
        bm.cache_full_blocks(seq)
        check(bm, live, set(bm.cached))
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == NUM_BLOCKS and sum(bm.ref_counts) == 0
