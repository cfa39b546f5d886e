"""The paged KV pool's bookkeeping: which block belongs to whom, and how many share it.

Blocks are reference-counted so that samples of one request share their prompt's
blocks; a shared block is copied before it is written (copy-on-write). The free list is
a deque: allocation and release are O(1) per block.
"""

from __future__ import annotations

from collections import deque

from raysvc.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _needs_copy(self, seq: Sequence) -> bool:
        """Is the block the next token goes into shared with another sequence?"""
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and self.ref_counts[seq.block_table[i]] > 1

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(total - len(seq.block_table), 0) + self._needs_copy(seq)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` room for `num_new_tokens` more tokens.

        Returns the (src, dst) block copies the model runner must do before the forward
        pass (copy-on-write of a shared, partly filled block).
        """
        assert self.can_allocate(seq, num_new_tokens)
        copies = []
        if self._needs_copy(seq):
            i = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_table[i], self._take()
            self._release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        # Tail first: the end of a sequence is the part least likely to be shared later.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)
