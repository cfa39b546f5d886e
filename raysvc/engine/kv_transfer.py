"""Moving KV between engines: a prefix's cached blocks, or a running sequence's whole KV.

A prefix computed by one worker is the same bytes on any worker running the same model
with the same dtype and block size: instead of recomputing it, another engine can take
those bytes and register the blocks in its own prefix cache (they then show in its KV
events like blocks it computed). `KVBlocks` is one transfer: the leading blocks of a hash
chain, all layers' K and V in one contiguous buffer, as raw bytes (a numpy array, which
Ray's object store hands over without copying; bf16 has no numpy dtype, bytes do).

`SequenceKV` is the other kind: a running sequence's KV (live migration off a draining
worker). It carries the token ids it covers instead of hashes, and its last block may be
partly filled: the sequence continues on the other engine after exactly those tokens,
so nothing is recomputed (`LLMEngine.migrate_out` / `add_request(resume_kv=)`).

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


@dataclass
class SequenceKV:
    """One sequence's computed KV, moving with it: positions 0 .. len(token_ids) - 1."""

    token_ids: list[int]
    fingerprint: dict[str, Any]
    data: np.ndarray  # uint8, as KVBlocks.data; the last block may be partly filled

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class CarriedKV:
    """A sequence's KV computed on another engine, waiting (in host memory) for the
    sequence to be admitted here: the scheduler gives it blocks, the engine writes these
    bytes into them, and the sequence's computed tokens start at `num_tokens`."""

    num_tokens: int
    blocks: torch.Tensor  # [layers, 2, cdiv(num_tokens, block_size), block_size, H, D]


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


def check_fingerprint(engine: LLMEngine, theirs: dict[str, Any], what: str) -> None:
    """ValueError naming every KV property that differs between `theirs` and this engine."""
    mine = kv_fingerprint(engine)
    differ = sorted(k for k in mine if mine[k] != theirs.get(k))
    if differ:
        raise ValueError(f"{what}: " + "; ".join(
            f"{k} is {theirs.get(k)!r} there, {mine[k]!r} here" for k in differ))


def _as_blocks(engine: LLMEngine, data: np.ndarray, num_blocks: int, what: str) -> torch.Tensor:
    """Transfer bytes as a host tensor [layers, 2, num_blocks, block_size, H, D] (a view)."""
    kv = engine.runner.kv_cache.data
    L, _, _, bs, H, D = kv.shape
    shape = (L, 2, num_blocks, bs, H, D)
    expected = int(np.prod(shape)) * kv.element_size()
    if data.dtype != np.uint8 or data.size != expected:
        raise ValueError(f"{what}: {data.size} bytes for {num_blocks} blocks; "
                         f"expected {expected}")
    with warnings.catch_warnings():  # Ray's object store hands over a read-only array: we
        warnings.simplefilter("ignore", UserWarning)  # only read from it
        return torch.from_numpy(np.ascontiguousarray(data)).view(kv.dtype).view(shape)


def _gather(engine: LLMEngine, blocks: list[int]) -> np.ndarray:
    """The bytes of `blocks` (all layers' K and V) in one host buffer."""
    data = engine.runner.kv_cache.data
    buffer = data.index_select(2, torch.tensor(blocks, device=data.device)).contiguous()
    host = buffer.cpu() if buffer.device.type != "cpu" else buffer
    return host.view(torch.uint8).numpy()


def export_sequence(engine: LLMEngine, seq) -> SequenceKV | None:
    """A sequence's computed KV (between steps, on the engine's thread); None if it has
    computed nothing."""
    n = seq.num_computed_tokens
    if n == 0:
        return None
    bs = engine.config.block_size
    blocks = seq.block_table[: -(-n // bs)]
    return SequenceKV(list(seq.token_ids[:n]), kv_fingerprint(engine), _gather(engine, blocks))


def carry_sequence(engine: LLMEngine, kv: SequenceKV, token_ids: list[int]) -> CarriedKV | None:
    """What of a migrated sequence's KV serves a request of `token_ids` here: the longest
    common run of their tokens, short of the last token (whose logits are needed). None
    if nothing does. ValueError if `kv` is for another model, dtype, block size or layout."""
    check_fingerprint(engine, kv.fingerprint, "resume_kv")
    limit = min(kv.num_tokens, len(token_ids) - 1)
    n = next((i for i in range(limit) if kv.token_ids[i] != token_ids[i]), limit)
    if n == 0:
        return None
    bs = engine.config.block_size
    blocks = _as_blocks(engine, kv.data, -(-kv.num_tokens // bs), "resume_kv")
    return CarriedKV(n, blocks[:, :, : -(-n // bs)])


def write_carried(engine: LLMEngine, seq, first: int) -> None:
    """Write a just-admitted sequence's carried KV into its blocks, from block `first` on
    (the ones before are prefix-cache hits holding the same tokens); the sequence then
    no longer holds the host copy."""
    carried, seq.carried_kv = seq.carried_kv, None
    bs = engine.config.block_size
    blocks = seq.block_table[first: -(-carried.num_tokens // bs)]
    data = engine.runner.kv_cache.data
    dst = torch.tensor(blocks, device=data.device)
    data.index_copy_(2, dst, carried.blocks[:, :, first:].to(data.device))


def export_blocks(engine: LLMEngine, block_hashes: list[bytes]) -> KVBlocks | None:
    """The KV of the longest leading run of `block_hashes` this engine holds (None if it
    holds not even the first). Runs between steps (the engine's thread), so no block
    changes while it is read."""
    blocks = engine.block_manager.cached_run(block_hashes)
    if not blocks:
        return None
    return KVBlocks(list(block_hashes[:len(blocks)]), kv_fingerprint(engine),
                    _gather(engine, blocks))


def import_blocks(engine: LLMEngine, kv: KVBlocks) -> int:
    """Register `kv`'s blocks in this engine's prefix cache (those it lacks, as many as its
    free blocks allow); how many were imported. ValueError if `kv` is not for this
    engine's model, dtype, block size and layout."""
    check_fingerprint(engine, kv.fingerprint, "kv_blocks")
    data = engine.runner.kv_cache.data
    source = _as_blocks(engine, kv.data, kv.num_blocks, "kv_blocks")

    def write(blocks: list[int], positions: list[int]) -> None:
        dst = torch.tensor(blocks, device=data.device)
        src = torch.tensor(positions)
        data.index_copy_(2, dst, source.index_select(2, src).to(data.device))

    return engine.block_manager.import_prefix(list(kv.block_hashes), write)

