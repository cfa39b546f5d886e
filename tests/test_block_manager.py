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
            if bm.can_allocate(seq, n, cached):
                free_before = bm.num_free_blocks
                bm.attach_cached(seq, cached)
                seq.num_computed_tokens = len(cached) * BLOCK_SIZE
                bm.allocate(seq, n)
                seq.num_computed_tokens += n
                bm.cache_full_blocks(seq)
                assert bm.num_free_blocks >= 0 and free_before >= bm.num_free_blocks
                live.append(seq)
        elif live and op[0] == "append":
            seq = live[op[1] % len(live)]
            free_before = bm.num_free_blocks
            needed = bm.blocks_needed(seq, op[2])
            if bm.can_allocate(seq, op[2]):
                copies = bm.allocate(seq, op[2])
                seq.token_ids += [9] * op[2]
                seq.num_computed_tokens += op[2]
                bm.cache_full_blocks(seq)
                assert len(copies) <= 1  # copy-on-write replaces at most one shared block
                assert bm.num_free_blocks == free_before - needed
            else:
                assert needed > free_before
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
