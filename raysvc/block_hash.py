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
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from `start_block` on (chained from `parent`).

    The cache salt enters the first block only; every later block inherits it through
    the chain, so requests with different salts never share a block.
    """
    hashes = []
    for i in range(start_block, len(token_ids) // block_size):
        extra = (cache_salt,) if i == 0 and cache_salt is not None else ()
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra)
        hashes.append(parent)
    return hashes
