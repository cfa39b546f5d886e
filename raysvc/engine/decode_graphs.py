"""CUDA graphs of uniform steps: one captured forward per (query length, padded batch size).

A decode step of a model this size is bound by the host, not the GPU: each layer launches
a few dozen kernels, each dispatched from Python (the built-in target: ~5 ms per step on
an H200 for well under 1 ms of GPU work). Replaying a captured graph launches them all
at once. Graphs cover the steps whose every sequence brings the same number of new
tokens: plain decoding (1), and speculative verification with k proposals each (k + 1);
the draft model's rounds after its first are decode steps too. Any other step (prefill
chunks, mixed batches, block copies) runs eagerly.

A graph replays fixed tensors, so a step's inputs (its `StepBatch`, built padded to the
graph's size) are copied into static buffers sized for the largest batch; a batch of b
sequences runs the graph of the smallest captured size >= b, its padding rows writing
nowhere (slot -1) and attending only to themselves.
The attention is the unified Triton kernel (its launch grid depends on the batch shape
alone). A decode batch for which the eager path would split the KV (few sequences on
long contexts: the split-KV kernel reads the KV up to twice as fast there) runs eagerly.

Without CUDA (`capture=False`) the same buffers run the forward eagerly: the CPU tests
check the padding and buffer logic against the plain path.
"""

from __future__ import annotations

import logging

import torch

from raysvc.engine.kv_cache import KVCache
from raysvc.engine.scheduler import SchedulerOutput
from raysvc.engine.step_batch import StepBatch
from raysvc.models.attention import AttentionBackend, AttentionMetadata, TritonAttention
from raysvc.models.llama import LlamaModel

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_VERIFY_SEQS = 64  # verification graphs (query length > 1) up to this batch size: larger
# batches rarely speculate, and their logits (seqs x (k+1) x vocab) would hold much memory


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, backend: AttentionBackend,
                 max_seqs: int, max_blocks_per_seq: int, capture: bool,
                 query_lens: tuple[int, ...] = (1,), split_aware: bool | None = None) -> None:
        """`split_aware` (default: when capturing): leave to the eager path the decode
        batches it would give the split-KV kernel."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.sizes = [b for b in BATCH_SIZES if b < max_seqs] + [max_seqs]
        self.max_seqs = max_seqs
        self.query_lens = tuple(sorted(set(query_lens)))
        self.capture = capture
        self.split_aware = capture if split_aware is None else split_aware
        self.backend = TritonAttention(graph_safe=True) if capture else backend
        n, dev = max_seqs * max(self.query_lens), model.device
        self.tokens = torch.zeros(3, n, dtype=torch.long, device=dev)  # as StepBatch.tokens
        self.input_ids, self.positions, self.slot_mapping = self.tokens
        self.slot_mapping.fill_(-1)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32,
                                        device=dev)
        self.seq_lens = torch.ones(max_seqs, dtype=torch.int32, device=dev)
        self.query_start_loc = {q: torch.arange(0, (max_seqs + 1) * q, q, dtype=torch.int32,
                                                device=dev) for q in self.query_lens}
        self.shapes = {(q, b) for q in self.query_lens for b in self.sizes
                       if q == 1 or b <= MAX_VERIFY_SEQS}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _forward(self, q: int, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[: b * q], block_tables=self.block_tables[:b],
            query_start_loc=self.query_start_loc[q][: b + 1], seq_lens=self.seq_lens[:b],
            max_query_len=q, max_seq_len=self.block_tables.shape[1] * self.block_size,
            block_size=self.block_size)
        self.backend.prepare(meta)
        hidden = self.model.forward(self.input_ids[: b * q], self.positions[: b * q],
                                    self.kv_cache.layers, meta, self.backend)
        return self.model.compute_logits(hidden)

    def _capture_all(self) -> None:
        pool = None
        # largest first: the smaller graphs then fit in the memory pool it leaves
        for q, b in sorted(self.shapes, key=lambda s: s[0] * s[1], reverse=True):
            self.seq_lens[:b].fill_(q)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up off the capture: compiles, allocator settles
                    self._forward(q, b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[q, b] = self._forward(q, b)
            pool = graph.pool()
            self.graphs[q, b] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (query lengths %s, batch sizes up to %d)",
                    len(self.graphs), self.query_lens, self.max_seqs)

    def padded_size(self, batch: SchedulerOutput) -> int | None:
        """The captured batch size the step runs at, or None when it runs eagerly: it must
        bring the same captured number of new tokens for every sequence, need no block
        copies and be small enough."""
        items = batch.scheduled
        if not items or len(items) > self.max_seqs or batch.block_copies:
            return None
        q = items[0].num_tokens
        size = next(s for s in self.sizes if s >= len(items))
        if (q, size) not in self.shapes or any(item.num_tokens != q for item in items):
            return None
        if q == 1 and self.split_aware:
            from raysvc_kernels.triton_attention import decode_num_splits

            longest = max(item.seq.num_computed_tokens + 1 for item in items)
            if decode_num_splits(len(items), self.kv_cache.data.shape[4], longest,
                                 self.model.device) != 1:
                return None
        return size

    def execute(self, step: StepBatch) -> torch.Tensor:
        """Logits [num_tokens, vocab] at every position of a step built for `padded_size`,
        in the flat batch order (as the eager runner would compute them before selecting
        rows)."""
        q, size = step.query_len, step.num_rows
        self.tokens[:, : size * q].copy_(step.tokens, non_blocking=True)
        self.seq_lens[:size].copy_(step.seq_lens, non_blocking=True)
        self.block_tables[:size, : step.width].copy_(step.block_tables, non_blocking=True)
        if self.capture:
            self.graphs[q, size].replay()
            return self.logits[q, size][: step.num_tokens]
        return self._forward(q, size)[: step.num_tokens]
