"""Moving prefix KV between engines: export a chain of cached blocks, import it elsewhere.

A prefix computed by one worker is the same bytes on any worker running the same model
with the same dtype and block size: instead of recomputing it, another engine can take
those bytes and register the blocks in its own prefix cache (they then show in its KV
events like blocks it computed). `KVBlocks` is one transfer: the leading blocks of a hash
chain, all layers' K and V in one contiguous buffer, as raw bytes (a numpy array, which
Ray's object store hands over without copying; bf16 has no numpy dtype, bytes do).

Refusals are explicit: a `KVBlocks` from a different model (config), dtype, block size or
KV layout is a ValueError naming what differs, never a wrong block. Import writes every
block's bytes before any of them is registered, so a failure leaves nothing half-made.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from raysvc.engine.llm_engine import LLMEngine


@dataclass
class KVBlocks:
    block_hashes: list[bytes]
    fingerprint: dict[str, Any]  # what must match on the importing side
    data: np.ndarray  # uint8: the bytes of [layers, 2, blocks, block_size, kv_heads, head_dim]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def kv_fingerprint(engine: LLMEngine) -> dict[str, Any]:
    """The engine's KV identity: blocks move only between engines where all of it is equal.
    Computed once per engine (it reads the model's config file)."""
    fp = engine.__dict__.get("_kv_fingerprint")
    if fp is None:
        config = (engine.model_path / "config.json").read_bytes()
        data = engine.runner.kv_cache.data
        fp = engine.__dict__["_kv_fingerprint"] = {
            "model": hashlib.sha256(config).hexdigest()[:16], "dtype": str(data.dtype),
            "block_size": engine.config.block_size,
            "layout": [data.shape[0], data.shape[4], data.shape[5]]}
    return fp


def export_blocks(engine: LLMEngine, block_hashes: list[bytes]) -> KVBlocks | None:
    """The KV of the longest leading run of `block_hashes` this engine holds (None if it
    holds not even the first). Runs between steps (the engine's thread), so no block
    changes while it is read."""
    blocks = engine.block_manager.cached_run(block_hashes)
    if not blocks:
        return None
    data = engine.runner.kv_cache.data
    index = torch.tensor(blocks, device=data.device)
    buffer = data.index_select(2, index).contiguous()  # [L, 2, n, bs, H, D]
    host = buffer.cpu() if buffer.device.type != "cpu" else buffer
    return KVBlocks(list(block_hashes[:len(blocks)]), kv_fingerprint(engine),
                    host.view(torch.uint8).numpy())


def import_blocks(engine: LLMEngine, kv: KVBlocks) -> int:
    """Register `kv`'s blocks in this engine's prefix cache (those it lacks, as many as its
    free blocks allow); how many were imported. ValueError if `kv` is not for this
    engine's model, dtype, block size and layout."""
    mine = kv_fingerprint(engine)
    differ = sorted(k for k in mine if mine[k] != kv.fingerprint.get(k))
    if differ:
        raise ValueError("kv_blocks: " + "; ".join(
            f"{k} is {kv.fingerprint.get(k)!r} there, {mine[k]!r} here" for k in differ))
    data = engine.runner.kv_cache.data
    L, _, _, bs, H, D = data.shape
    shape = (L, 2, kv.num_blocks, bs, H, D)
    expected = int(np.prod(shape)) * data.element_size()
    if kv.data.dtype != np.uint8 or kv.data.size != expected:
        raise ValueError(f"kv_blocks: {kv.data.size} bytes for {kv.num_blocks} blocks; "
                         f"expected {expected}")
    with warnings.catch_warnings():  # Ray's object store hands over a read-only array: we
        warnings.simplefilter("ignore", UserWarning)  # only read from it
        source = torch.from_numpy(np.ascontiguousarray(kv.data)).view(data.dtype).view(shape)

    def write(blocks: list[int], positions: list[int]) -> None:
        dst = torch.tensor(blocks, device=data.device)
        src = torch.tensor(positions)
        data.index_copy_(2, dst, source.index_select(2, src).to(data.device))

    return engine.block_manager.import_prefix(list(kv.block_hashes), write)

