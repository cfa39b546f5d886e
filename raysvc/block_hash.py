"""Block hashes for prefix caching: one function shared by the engine, router and ingress.

A full block of `block_size` tokens is named by hash(parent block's hash, its token ids,
extra keys), so a hash names the whole prefix up to and including that block. SHA-256
over a fixed byte encoding: the same on every process and machine (Python's `hash()` is
salted per process). No torch, no engine: the router and the ingress import this alone.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes: a truncated SHA-256 (collisions need ~2^64 blocks)


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> BlockHash:
    h = hashlib.sha256()
    h.update(parent or b"\0" * 16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        data = key.encode()
        h.update(struct.pack("<q", len(data)) + data)
    return h.digest()[:16]


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    parent: BlockHash | None = None,
    start_block: int = 0,
    lora_name: str | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from `start_block` on (chained from `parent`).

    The cache salt and the LoRA adapter enter the first block only; every later block
    inherits them through the chain, so requests with different salts, or computed with
    different adapters (or none), never share a block.
    """
    first = first_block_keys(cache_salt, lora_name)
    hashes = []
    for i in range(start_block, len(token_ids) // block_size):
        extra = first if i == 0 else ()
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra)
        hashes.append(parent)
    return hashes


def first_block_keys(cache_salt: str | None, lora_name: str | None) -> tuple[str, ...]:
    """The extra keys of a prompt's first block. Prefixed so a salt can never pose as an
    adapter; a request with neither hashes exactly as it always has."""
    keys = () if cache_salt is None else (cache_salt,)
    return keys if lora_name is None else (*keys, "lora:" + lora_name)
