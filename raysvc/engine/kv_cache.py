"""The paged KV pool's memory: one tensor holding every layer's K and V blocks."""

from __future__ import annotations

import gc
import logging

import torch

from raysvc.models.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


class KVCache:
    """K/V of all layers: [num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim].

    Blocks 0 .. num_blocks - 1 are the block manager's; one more, `null_block`, is never
    handed out: the entries of a block table past a sequence's length, and the rows of a
    padded batch, point there instead of at a live block (as vLLM's null block)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.null_block = num_blocks
        self.block_size = block_size
        # Zeroed, not empty: masked-out padding still multiplies whatever a slot holds.
        self.data = torch.zeros(config.num_layers, 2, num_blocks + 1, block_size,
                                config.num_kv_heads, config.head_dim, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(config.num_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.data.device)
        dst = torch.tensor([d for _, d in copies], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem


def plan_num_blocks(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    num_kv_blocks: int | None,
    kv_cache_memory_bytes: int | None,
    gpu_memory_utilization: float,
    reserve_bytes: int,
) -> int:
    """How many blocks the pool gets: explicit, a byte budget, or a share of free GPU memory."""
    per_token = bytes_per_token(config, dtype)
    per_block = per_token * block_size
    if num_kv_blocks is not None:
        num_blocks = num_kv_blocks
    elif kv_cache_memory_bytes is not None:
        num_blocks = kv_cache_memory_bytes // per_block
    elif device.type == "cuda":
        gc.collect()  # a previous engine in this process may still await collection
        free, total = torch.cuda.mem_get_info(device)
        # memory torch's caching allocator holds but no tensor uses is ours to reuse
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = free - (1 - gpu_memory_utilization) * total - reserve_bytes
        num_blocks = int(budget // per_block)
    else:
        num_blocks = DEFAULT_CPU_KV_BYTES // per_block
    if num_blocks < 1:
        raise ValueError(
            f"num_kv_blocks: the KV budget holds {num_blocks} blocks of {per_block} bytes; "
            "raise kv_cache_memory_bytes / gpu_memory_utilization or set num_kv_blocks"
        )
    logger.info("KV cache: %d bytes per token; %d blocks x %d tokens = %d tokens fit (%.1f MiB)",
                per_token, num_blocks, block_size, num_blocks * block_size,
                num_blocks * per_block / 2**20)
    return num_blocks
