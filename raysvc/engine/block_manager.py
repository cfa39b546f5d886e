"""The paged KV pool's bookkeeping: who holds which block, and which blocks hold a prefix.

Blocks are reference-counted: samples of one request share their prompt's blocks (a
shared, partly filled block is copied before it is written), and with prefix caching
requests share every full block whose hash chain matches.

Free blocks sit in one queue ordered for eviction (an OrderedDict: O(1) take from the
front, O(1) removal of a cache hit from anywhere):

    front: blocks holding nothing reusable   ...   cached blocks, least recently used first

A freed block that holds a full, hashed prefix goes to the back and stays findable by its
hash until the pool needs it; eviction is lazy (a block loses its hash only when taken
for new data). Every store and eviction of a hash is recorded as a KV event, so a
router can mirror exactly which prefixes this engine holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from raysvc.block_hash import BlockHash, hash_blocks
from raysvc.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class KVEvent:
    kind: str  # "stored" | "removed"
    block_hashes: list[BlockHash]


@dataclass(slots=True)
class KVEventBatch:
    """What one engine step changed in the prefix cache, in order."""

    step: int
    events: list[KVEvent] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # hash -> the block holding that prefix
        self.events: list[KVEvent] = []
        self.num_cached_free = 0  # free blocks that still hold a cached prefix
        self.host = None  # a HostTier (raysvc.engine.host_tier): evicted prefixes kept there

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    # -- prefix cache ------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The longest run of the sequence's leading full blocks already in the pool.

        Never the whole sequence: the last token is always computed, its logits are needed.
        """
        if not self.enable_prefix_caching or seq.request.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        hits = self.cached_run(hashes)
        if self.host is not None and len(hits) < len(hashes) and \
                self.host.reload(self, hashes, len(hits)):
            hits = self.cached_run(hashes)  # the host tier's continuation, back on the device
        return hits

    def cached_run(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest leading run of `hashes` (a prefix chain)."""
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def import_prefix(self, hashes: list[BlockHash],
                      write: Callable[[list[int], list[int]], None]) -> int:
        """Take in a prefix chain computed elsewhere: for the blocks of `hashes` this pool
        lacks, free blocks are taken, `write(blocks, positions)` fills them (positions:
        their indexes in `hashes`), and only then are they registered under their hashes
        (evictable, as after a finished request; recorded as stored). The blocks of the
        chain already here are held meanwhile, so taking room never evicts them. Imports
        as many leading blocks as the free queue allows without evicting the chain; if
        `write` raises, nothing is registered and every block goes back. Returns how many
        blocks were imported."""
        if not self.enable_prefix_caching:
            return 0
        have = [self.cached.get(h) for h in hashes]
        held = [b for b in have if b is not None]
        for block in held:  # pin: out of the free queue while we take room
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
                self.num_cached_free -= 1
            self.ref_counts[block] += 1
        taken: list[int] = []
        positions: list[int] = []
        try:
            for i, block in enumerate(have):
                if block is None:
                    if not self.free_queue:
                        break  # the chain stays whole up to here
                    taken.append(self._take())
                    positions.append(i)
            if taken:
                write(taken, positions)
        except BaseException:
            for block in taken:
                self._release(block)
            raise
        finally:
            for block in held:
                self._release(block)
        stored = []
        for block, i in zip(taken, positions, strict=True):
            h = hashes[i]
            self.block_hash[block] = h
            self.cached[h] = block
            stored.append(h)
            self._release(block)  # to the back of the free queue: cached, evictable
        if stored:
            self._record("stored", stored)
        return len(taken)

    def _attach_cached(self, seq: Sequence, blocks: list[int]) -> None:
        """Give a fresh sequence the cached blocks of its prefix (shared, read-only)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
                self.num_cached_free -= 1
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)
        seq.num_cached_blocks = len(blocks)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed this step under their hashes."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if seq.num_cached_blocks >= num_full:
            return
        hashes = self._block_hashes(seq, num_full)
        stored = []
        for i in range(seq.num_cached_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
                stored.append(h)
        seq.num_cached_blocks = num_full
        if stored:
            self._record("stored", stored)

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """The sequence's chained block hashes, extended incrementally as it grows."""
        have = len(seq.block_hashes)
        if have < num_blocks:
            seq.block_hashes += hash_blocks(
                seq.token_ids[: num_blocks * self.block_size], self.block_size,
                seq.request.params.cache_salt, seq.block_hashes[-1] if have else None, have,
                seq.request.params.lora_name,
            )
        return seq.block_hashes[:num_blocks]

    def _record(self, kind: str, hashes: list[BlockHash]) -> None:
        if self.events and self.events[-1].kind == kind:
            self.events[-1].block_hashes += hashes
        else:
            self.events.append(KVEvent(kind, hashes))

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    # -- allocation --------------------------------------------------------------------

    def _needs_copy(self, seq: Sequence) -> bool:
        """Is the block the next token goes into shared with another sequence?"""
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and self.ref_counts[seq.block_table[i]] > 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       num_lookahead_tokens: int = 0,
                       cached: list[int] = ()) -> list[tuple[int, int]] | None:
        """Room for the sequence's next `num_new_tokens` tokens plus `num_lookahead_tokens`
        speculative proposals computed with them — all of it, or nothing changed and None.

        The one writer of block tables (as vLLM's `KVCacheManager.allocate_slots`): prefill
        chunks, decodes, proposals (given back by `truncate` once verified) and, for a fresh
        sequence, the `cached` prefix blocks it attaches first (those that sit in the free
        queue leave it, so they count against the free blocks too).

        Returns the (src, dst) block copies the model runner must do before the forward pass
        (copy-on-write of a shared, partly filled block).
        """
        n = num_new_tokens + num_lookahead_tokens
        if cached:
            assert not seq.block_table and seq.num_computed_tokens == 0
            revived = sum(1 for b in cached if self.ref_counts[b] == 0)
            total = cdiv(len(cached) * self.block_size + n, self.block_size)
            if total - len(cached) + revived > len(self.free_queue):
                return None
            self._attach_cached(seq, cached)
            seq.num_computed_tokens = len(cached) * self.block_size
        else:
            total = cdiv(seq.num_computed_tokens + n, self.block_size)
            needed = max(total - len(seq.block_table), 0) + self._needs_copy(seq)
            if needed > len(self.free_queue):
                return None
        copies = []
        if self._needs_copy(seq):
            i = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_table[i], self._take()
            self._release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        while len(seq.block_table) < total:
            seq.block_table.append(self._take())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        child.num_cached_blocks = parent.num_cached_blocks
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        # Tail first: a request's tail is the part least likely to be shared, so it
        # sits nearest the front of the eviction order.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def truncate(self, seq: Sequence) -> None:
        """Release the blocks past the sequence's computed tokens (rejected proposals)."""
        keep = cdiv(seq.num_computed_tokens, self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def _take(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict: the pool needs the block for new data
            if self.host is not None:
                self.host.spill(h, block)
            self.block_hash[block] = None
            del self.cached[h]
            self.num_cached_free -= 1
            self._record("removed", [h])
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None
            if self.block_hash[block] is None:
                self.free_queue.move_to_end(block, last=False)  # nothing to keep: reuse first
            else:
                self.num_cached_free += 1
