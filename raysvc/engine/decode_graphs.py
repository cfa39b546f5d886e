"""CUDA graphs of a decode step: one captured forward per padded batch size.

A small model's decode step is bound by the host, not the GPU: each layer launches a few
dozen kernels, each dispatched from Python (the built-in draft: ~1.3 ms per round on an
H200 for ~50 µs of GPU work). Replaying a captured graph launches them all at once. The
draft model's rounds are where this pays first: the same sequences decode k times in a
row, one token each, so every round after the first has the shape a graph needs.

A graph replays fixed tensors, so a step's inputs are copied into static buffers sized
for the largest batch; a batch of b sequences runs the graph of the smallest captured
size >= b, its padding rows writing nowhere (slot -1) and attending to one slot. The
attention is the unified Triton kernel (its launch grid depends on the batch shape
alone; the split-KV choice would depend on lengths known only at replay).

Without CUDA (`capture=False`) the same buffers run the forward eagerly: the CPU tests
check the padding and buffer logic against the plain path.
"""

from __future__ import annotations

import torch

from raysvc.engine.kv_cache import KVCache
from raysvc.engine.scheduler import SchedulerOutput
from raysvc.models.attention import AttentionBackend, AttentionMetadata, TritonAttention
from raysvc.models.llama import LlamaModel

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class UnifiedTritonAttention(TritonAttention):
    """Triton attention that always takes the unified kernel (graph-safe: no split-KV)."""

    def attend(self, q, k, v, k_cache, v_cache, meta, scale):
        from kernels.triton_attention import launch_unified, unified_config

        gqa = q.shape[1] // k_cache.shape[2]
        out = torch.empty_like(q)
        return launch_unified(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                              meta.seq_lens, scale, out,
                              unified_config(1, gqa, q.shape[2], q.dtype))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, backend: AttentionBackend,
                 max_seqs: int, max_blocks_per_seq: int, capture: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.sizes = [b for b in BATCH_SIZES if b < max_seqs] + [max_seqs]
        self.max_seqs = max_seqs
        self.capture = capture
        self.backend = UnifiedTritonAttention() if capture else backend
        n, dev = max_seqs, model.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            query_start_loc=self.query_start_loc[: b + 1], seq_lens=self.seq_lens[:b],
            max_query_len=1, max_seq_len=self.block_tables.shape[1] * self.block_size,
            block_size=self.block_size)
        self.backend.prepare(meta)
        hidden = self.model.forward(self.input_ids[:b], self.positions[:b], self.kv_cache.layers,
                                    meta, self.backend)
        return self.model.compute_logits(hidden)

    def _capture_all(self) -> None:
        pool = None
        for b in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up off the capture: compiles, allocator settles
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, batch: SchedulerOutput) -> bool:
        """A decode-only batch (one new token per sequence, no block copies) small enough."""
        return (len(batch.scheduled) <= self.max_seqs and not batch.block_copies
                and all(item.num_tokens == 1 for item in batch.scheduled))

    def execute(self, batch: SchedulerOutput) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a batch that `fits`, one row per sequence."""
        b = len(batch.scheduled)
        size = next(s for s in self.sizes if s >= b)
        bs, width = self.block_size, self.block_tables.shape[1]
        ids, pos, slots, lens, tables = [], [], [], [], []
        for item in batch.scheduled:
            seq = item.seq
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
        pad = size - b
        dev = self.input_ids.device
        # one host->device copy for the per-token values, one for the block tables
        packed = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [-1] * pad,
                               lens + [1] * pad], dtype=torch.long).to(dev, non_blocking=True)
        self.input_ids[:size].copy_(packed[0])
        self.positions[:size].copy_(packed[1])
        self.slot_mapping[:size].copy_(packed[2])
        self.seq_lens[:size].copy_(packed[3])
        self.block_tables[:b].copy_(torch.tensor(tables, dtype=torch.int32).to(dev,
                                                                               non_blocking=True))
        self.block_tables[b:size].zero_()
        if self.capture:
            self.graphs[size].replay()
            return self.logits[size][:b]
        return self._forward(size)[:b]
