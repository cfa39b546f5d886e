"""Property-based tests: random allocate / append / fork / free / abort keep the counts honest.

The oracle is a plain recount: every block's reference count must equal the number of
live sequences whose block table holds it, and free blocks are exactly those with count 0.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from raysvc.engine.block_manager import BlockManager, cdiv
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.sequence import Request, Sequence

NUM_BLOCKS, BLOCK_SIZE = 24, 8

ops = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.integers(1, 60)),
        st.tuples(st.just("append"), st.integers(0, 7), st.integers(1, 20)),
        st.tuples(st.just("fork"), st.integers(0, 7)),
        st.tuples(st.just("free"), st.integers(0, 7)),
    ),
    max_size=60,
)


def check(bm: BlockManager, live: list[Sequence]) -> None:
    held = Counter(b for s in live for b in s.block_table)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == held.get(block, 0)
    assert sorted(bm.free_blocks) == [b for b in range(bm.num_blocks) if held.get(b, 0) == 0]
    assert len(set(bm.free_blocks)) == len(bm.free_blocks)
    for s in live:
        assert len(s.block_table) == cdiv(s.num_computed_tokens, BLOCK_SIZE)
        # no sequence holds the same block twice
        assert len(set(s.block_table)) == len(s.block_table)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operations_keep_counts_consistent(operations):
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    live: list[Sequence] = []
    for op in operations:
        if op[0] == "new":
            seq = Request("r", None, [1] * op[1], SamplingParams(), ()).seqs[0]
            if bm.can_allocate(seq, op[1]):
                bm.allocate(seq, op[1])
                seq.num_computed_tokens = op[1]
                live.append(seq)
        elif live and op[0] == "append":
            seq = live[op[1] % len(live)]
            free_before = bm.num_free_blocks
            needed = bm.blocks_needed(seq, op[2])
            if bm.can_allocate(seq, op[2]):
                copies = bm.allocate(seq, op[2])
                seq.token_ids += [1] * op[2]
                seq.num_computed_tokens += op[2]
                # a copy-on-write copy replaces exactly one shared block
                assert len(copies) <= 1
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
        check(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == NUM_BLOCKS
    assert sum(bm.ref_counts) == 0
