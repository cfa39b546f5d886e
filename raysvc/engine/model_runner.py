"""Runs the model over one step's flat batch (`raysvc.engine.step_batch`).

The batch is every scheduled sequence's new tokens, concatenated; positions, slot
mapping, block tables and query boundaries describe where each token sits in its
sequence and in the paged pool. A uniform step replays a CUDA graph when there is one; a
step with LoRA adapters runs eagerly, its rows' adapters put into device slots first.
"""

from __future__ import annotations

import torch

from raysvc.engine.decode_graphs import DecodeGraphs
from raysvc.engine.kv_cache import KVCache
from raysvc.engine.scheduler import SchedulerOutput
from raysvc.engine.step_batch import LogitsPlan, StepBatch, StepBuilder, plan_logits
from raysvc.models.attention import AttentionBackend, AttentionMetadata
from raysvc.models.llama import LlamaModel
from raysvc.models.lora import LoRABatch, LoRASlots


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, backend: AttentionBackend) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = model.device
        self.block_size = kv_cache.block_size
        self.graphs: DecodeGraphs | None = None
        self.lora_slots: LoRASlots | None = None  # set by an engine with enable_lora
        self.builder = StepBuilder(self.block_size, kv_cache.null_block,
                                   pin_memory=self.device.type == "cuda")

    def capture_graphs(self, max_seqs: int, max_model_len: int,
                       query_lens: tuple[int, ...] = (1,)) -> None:
        """CUDA graphs for the uniform steps (see raysvc.engine.decode_graphs)."""
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.backend, max_seqs,
                                   -(-max_model_len // self.block_size), capture=True,
                                   query_lens=query_lens)

    def prepare(self, batch: SchedulerOutput,
                logits: LogitsPlan | list[int] | None = None) -> StepBatch:
        """The step's plan: its inputs, padded for a graph when one fits, and its logits
        rows (default: the engine's, `plan_logits`; a list: just those flat rows)."""
        if logits is None:
            logits = plan_logits(batch)
        elif not isinstance(logits, LogitsPlan):
            logits = LogitsPlan(indices=list(logits))
        size = None
        if self.graphs is not None and not self._slots(batch):
            size = self.graphs.padded_size(batch)
        return self.builder.build(batch, logits, pad_to=size)

    def _slots(self, batch: SchedulerOutput) -> dict[int, int]:
        """The step's LoRA adapters in device slots: id(adapter) -> slot (adapters told
        apart by identity: a reloaded name is another adapter); decided once per step."""
        if self.lora_slots is None:
            return {}
        if batch.lora_slots is None:
            adapters = {id(s.seq.request.lora): s.seq.request.lora for s in batch.scheduled
                        if s.seq.request.lora is not None}
            batch.lora_slots = self.lora_slots.activate(list(adapters.values())) \
                if adapters else {}
        return batch.lora_slots

    def execute(self, step: StepBatch) -> torch.Tensor:
        """Run one step; return logits [len(step.logits.indices), vocab], one row per
        planned index."""
        indices = step.logits.indices
        if step.query_len is not None:
            logits = self.graphs.execute(step)
            self.builder.copies_issued()
            every_row = len(indices) == logits.shape[0] and (not indices or indices[0] == 0)
            return logits if every_row else logits[indices]  # indices are increasing
        if step.batch.block_copies:
            self.kv_cache.copy_blocks(step.batch.block_copies)
        input_ids, positions, meta = self.device_inputs(step)
        hidden = self.model.forward(input_ids, positions, self.kv_cache.layers, meta, self.backend,
                                    self._lora_batch(step.batch))
        return self.model.compute_logits(hidden[indices])

    def order_by_adapter(self, batch: SchedulerOutput) -> None:
        """Put the step's adapters in slots and its rows in slot order (base rows first):
        each adapter's tokens then form one run, and the step's slots mostly a range
        (`LoRABatch` slices instead of gathering). Rows may come in any order: the step's
        plan follows `batch.scheduled`."""
        slot_of = self._slots(batch)
        if slot_of:
            batch.scheduled.sort(key=lambda s: -1 if s.seq.request.lora is None
                                 else slot_of[id(s.seq.request.lora)])

    def _lora_batch(self, batch: SchedulerOutput) -> LoRABatch | None:
        """Each token's slot, for a step with adapters; None without."""
        slot_of = self._slots(batch)
        if not slot_of:
            return None
        token_slots: list[int] = []
        for item in batch.scheduled:
            lora = item.seq.request.lora
            token_slots += [-1 if lora is None else slot_of[id(lora)]] * item.num_tokens
        return LoRABatch(self.lora_slots, token_slots, self.device,
                         use_triton=self.backend.name == "triton")

    def device_inputs(
        self, step: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids [num_tokens], positions [num_tokens] and the attention metadata,
        in two host-to-device copies (none on CPU: the host buffers are the inputs)."""
        tokens = step.tokens.to(self.device, non_blocking=True)
        ints = step.ints.to(self.device, non_blocking=True)
        self.builder.copies_issued()
        rows, width = step.num_rows, step.width
        meta = AttentionMetadata(
            slot_mapping=tokens[2],
            block_tables=ints[2 * rows + 1:].view(rows, width),
            query_start_loc=ints[rows: 2 * rows + 1],
            seq_lens=ints[:rows],
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            block_size=self.block_size,
        )
        self.backend.prepare(meta)
        return tokens[0], tokens[1], meta


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
                runner.execute(runner.prepare(SchedulerOutput([ScheduledSeq(seq, q_len)]),
                                              [q_len - 1]))
            finally:
                block_manager.free(seq)
        q_len *= 2
