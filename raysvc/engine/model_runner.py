"""Builds one step's flat input batch and runs the model over it.

The batch is every scheduled sequence's new tokens, concatenated; positions, slot
mapping, block tables and query boundaries describe where each token sits in its
sequence and in the paged pool.
"""

from __future__ import annotations

import torch

from raysvc.engine.decode_graphs import DecodeGraphs
from raysvc.engine.kv_cache import KVCache
from raysvc.engine.scheduler import SchedulerOutput
from raysvc.models.attention import AttentionBackend, AttentionMetadata
from raysvc.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, backend: AttentionBackend) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = model.device
        self.block_size = kv_cache.block_size
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, max_seqs: int, max_model_len: int,
                       query_lens: tuple[int, ...] = (1,)) -> None:
        """CUDA graphs for the uniform steps (see raysvc.engine.decode_graphs)."""
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.backend, max_seqs,
                                   -(-max_model_len // self.block_size), capture=True,
                                   query_lens=query_lens)

    def execute(self, batch: SchedulerOutput, logits_indices: list[int]) -> torch.Tensor:
        """Run one step; return logits [len(logits_indices), vocab] at the given positions
        of the flat batch (a sampling sequence's last token; a speculating one's last
        k + 1 tokens). Uniform steps replay a CUDA graph when there is one."""
        if self.graphs is not None and self.graphs.fits(batch):
            logits = self.graphs.execute(batch)
            every_row = len(logits_indices) == logits.shape[0] and logits_indices[0] == 0
            return logits if every_row else logits[logits_indices]  # indices are increasing
        if batch.block_copies:
            self.kv_cache.copy_blocks(batch.block_copies)
        input_ids, positions, meta = self.prepare_inputs(batch)
        hidden = self.model.forward(input_ids, positions, self.kv_cache.layers, meta, self.backend)
        return self.model.compute_logits(hidden[logits_indices])

    def prepare_inputs(
        self, batch: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids [num_tokens], positions [num_tokens] and the attention metadata."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for item in batch.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_tokens
            input_ids += seq.token_ids[start:end]
            if end > seq.num_tokens:  # speculative proposals ride after the known tokens
                input_ids += seq.spec_token_ids[: end - seq.num_tokens]
            positions += range(start, end)
            query_start.append(query_start[-1] + item.num_tokens)
            seq_lens.append(end)
            tables.append(seq.block_table)
        max_blocks = max(len(t) for t in tables)
        dev = self.device
        null = self.kv_cache.null_block
        block_tables = torch.tensor([t + [null] * (max_blocks - len(t)) for t in tables],
                                    dtype=torch.int32, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        query_start_loc = torch.tensor(query_start, dtype=torch.int32, device=dev)
        q_lens = [e - s for s, e in zip(query_start, query_start[1:], strict=False)]
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(tables), device=dev), torch.tensor(q_lens, device=dev)
        )
        bs = self.block_size
        slot_mapping = block_tables[seq_of_token, pos // bs].long() * bs + pos % bs
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            query_start_loc=query_start_loc,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
        )
        self.backend.prepare(meta)
        return torch.tensor(input_ids, dtype=torch.long, device=dev), pos, meta


def warm_up(runner: ModelRunner, block_manager, max_tokens: int) -> None:
    """Run one forward per query-length bucket so Triton compiles its kernel variants at
    start-up, not in the middle of serving (a first compile stalls a step for seconds).
    Dummy sequences take blocks and give them back; nothing is cached."""
    from raysvc.engine.sampling_params import SamplingParams
    from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
    from raysvc.engine.sequence import Request

    q_len = 1
    while q_len <= max_tokens:
        for context in {q_len, q_len + 17}:  # a plain prefill, and new tokens on a prefix
            if context > max_tokens:
                continue
            seq = Request("warm-up", None, [0] * context, SamplingParams(), ()).seqs[0]
            if block_manager.allocate_slots(seq, context) is None:
                continue
            seq.num_computed_tokens = context - q_len
            try:
                runner.execute(SchedulerOutput([ScheduledSeq(seq, q_len)]), [q_len - 1])
            finally:
                block_manager.free(seq)
        q_len *= 2
