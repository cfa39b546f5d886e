"""A host-memory tier under the device KV pool: evicted prefix blocks are kept, not lost.

When the pool needs a block that holds a cached prefix, the block manager evicts it; with
this tier the block's K and V (all layers) are first copied to host memory, under its
hash, LRU-bounded by `capacity_bytes` (`kv_offload_bytes`). When a new sequence's prefix
runs past what the device still holds, the tier's continuation of that chain is copied
back into free device blocks and registered like computed ones (`BlockManager.
import_prefix`: bytes first, then the hashes), so the scheduler finds it as a hit.

On a GPU this trades PCIe time for prefill compute (SGLang's HiCache, vLLM's CPU offload,
LMCache do the same); on a CPU the "device" pool is host memory already, so the tier is
off by default there and only makes sense to test with.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from raysvc.block_hash import BlockHash


class HostTier:
    def __init__(self, kv_data: torch.Tensor, capacity_bytes: int) -> None:
        self.data = kv_data  # the pool: [layers, 2, blocks + 1, block_size, heads, dim]
        self.block_bytes = kv_data[:, :, 0].numel() * kv_data.element_size()
        self.capacity_blocks = capacity_bytes // self.block_bytes
        self._pin = kv_data.device.type == "cuda"
        self.store: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()  # LRU first
        self.spills = 0  # blocks copied out on eviction
        self.reloads = 0  # blocks copied back for a hit

    def spill(self, h: BlockHash, block: int) -> None:
        """Keep evicted block `block` (holding prefix `h`) before the pool reuses it."""
        if self.capacity_blocks <= 0:
            return
        if h in self.store:
            self.store.move_to_end(h)
            return
        kv = self.data[:, :, block].to("cpu", copy=True)
        self.store[h] = kv.pin_memory() if self._pin else kv
        self.spills += 1
        while len(self.store) > self.capacity_blocks:
            self.store.popitem(last=False)

    def reload(self, block_manager, hashes: list[BlockHash], start: int) -> int:
        """Bring back the run of `hashes` from `start` that this tier holds (after the
        device's own run `hashes[:start]`); how many blocks came back."""
        end = start
        while end < len(hashes) and hashes[end] in self.store:
            end += 1
        if end == start:
            return 0
        chain = hashes[:end]
        # held here: taking device blocks may evict others into this tier, which may drop
        # its oldest entries -- these among them
        saved = {h: self.store[h] for h in chain[start:]}

        def write(blocks: list[int], positions: list[int]) -> None:
            kv = torch.stack([saved[chain[p]] for p in positions], dim=2)
            dst = torch.tensor(blocks, device=self.data.device)
            self.data.index_copy_(2, dst, kv.to(self.data.device, non_blocking=True))

        n = block_manager.import_prefix(chain, write)
        for h in chain[start:start + n]:
            if h in self.store:
                self.store.move_to_end(h)
        self.reloads += n
        return n

    @property
    def num_blocks(self) -> int:
        return len(self.store)
