"""One step's plan, built once from the scheduler's output: what the model runs and which
logits rows the step reads.

A `StepBatch` holds the flat token ids, positions and slot mapping of every scheduled
sequence's new tokens, each sequence's block table, query start and length, and the
logits plan (which rows sample a token, which verify k proposals, which score prompt
tokens). The eager forward and a CUDA graph's replay both read it; nothing else builds
model inputs.

Its host arrays are persistent (numpy over pinned memory on CUDA) and grow only when a
step is larger than any before, so a step allocates nothing on the host and reaches the
device in two copies (one int64, one int32). Positions and slots are computed with numpy
from each sequence's start, not per token in Python. The copies from pinned memory are
asynchronous: whoever issues them calls `copies_issued`, and the next build waits for them
before it writes the buffers again (a step that samples nothing, such as a prefill chunk,
does not otherwise wait for the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
from raysvc.engine.sequence import Request, Sequence


@dataclass(slots=True)
class LogitsPlan:
    """Which rows of the flat batch get logits, and what each is for."""

    indices: list[int] = field(default_factory=list)  # flat-batch rows, increasing
    sampling: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, its row)
    speculating: list[tuple[ScheduledSeq, int]] = field(default_factory=list)  # first row
    prompt_rows: list[tuple[Request, int, int]] = field(default_factory=list)
    # (request, prompt position, row): position i's logits score prompt token i + 1


def plan_logits(batch: SchedulerOutput) -> LogitsPlan:
    """The engine's rows: the last token of a sequence that caught up (it samples), the
    last k + 1 of one that speculates (they are verified), and the prompt positions whose
    logprobs were asked for."""
    plan = LogitsPlan()
    end = 0
    for item in batch.scheduled:
        seq = item.seq
        end += item.num_tokens
        if seq.request.prompt_logprobs is not None:
            start = seq.num_computed_tokens
            first = max(start, len(seq.request.prompt_logprobs) - 1)
            for pos in range(first, min(start + item.num_tokens, seq.num_prompt_tokens - 1)):
                plan.prompt_rows.append((seq.request, pos, len(plan.indices)))
                plan.indices.append(end - item.num_tokens + pos - start)
        if item.num_spec:
            plan.speculating.append((item, len(plan.indices)))
            plan.indices += range(end - item.num_spec - 1, end)
        elif seq.num_computed_tokens + item.num_tokens == seq.num_tokens:
            plan.sampling.append((seq, len(plan.indices)))
            plan.indices.append(end - 1)
    return plan


@dataclass(slots=True)
class StepBatch:
    """One step's inputs on the host. Rows past `num_seqs` (tokens past `num_tokens`)
    pad a graph's batch: they write nowhere (slot -1) and attend only to themselves."""

    batch: SchedulerOutput
    logits: LogitsPlan
    num_seqs: int
    num_tokens: int
    num_rows: int  # sequences incl. padding
    query_len: int | None  # the uniform new-token count of a padded (graph) step
    max_query_len: int
    max_seq_len: int
    width: int  # block-table columns
    tokens: torch.Tensor  # [3, padded tokens] int64: input ids, positions, slot mapping
    ints: torch.Tensor  # int32: seq_lens [rows], query_start_loc [rows + 1], tables [rows*width]

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.ints[: self.num_rows]

    @property
    def query_start_loc(self) -> torch.Tensor:
        return self.ints[self.num_rows: 2 * self.num_rows + 1]

    @property
    def block_tables(self) -> torch.Tensor:
        start = 2 * self.num_rows + 1
        return self.ints[start: start + self.num_rows * self.width].view(self.num_rows,
                                                                         self.width)


class StepBuilder:
    """Fills one `StepBatch` per step into persistent host buffers."""

    def __init__(self, block_size: int, null_block: int, pin_memory: bool) -> None:
        self.block_size = block_size
        self.null_block = null_block
        self.pin_memory = pin_memory
        self._tokens = self._alloc((3, 0), torch.long)
        self._ints = self._alloc((0,), torch.int32)
        self._copied: torch.cuda.Event | None = None  # the last step's copies, once issued

    def copies_issued(self) -> None:
        """The step's buffers are being copied to the device (asynchronously from pinned
        memory): the next build waits for that before writing them."""
        if self.pin_memory:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)

    def build(self, batch: SchedulerOutput, logits: LogitsPlan,
              pad_to: int | None = None) -> StepBatch:
        """`pad_to`: the graph batch size to pad a uniform step to (None: eager, no pad)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        items = batch.scheduled
        b = len(items)
        q_lens = [item.num_tokens for item in items]
        rows = b if pad_to is None else pad_to
        pad_q = q_lens[0] if pad_to is not None else 0
        n = sum(q_lens)
        total = n + (rows - b) * pad_q
        width = max(max(len(item.seq.block_table) for item in items),
                    -(-pad_q // self.block_size))
        if self._tokens.shape[1] < total:
            self._tokens = self._alloc((3, max(total, 2 * self._tokens.shape[1])), torch.long)
        need = 2 * rows + 1 + rows * width
        if self._ints.shape[0] < need:
            self._ints = self._alloc((max(need, 2 * self._ints.shape[0]),), torch.int32)
        tokens, ints = self._tokens[:, :total], self._ints[:need]
        tok, flat = tokens.numpy(), ints.numpy()
        ids, pos, slots = tok[0], tok[1], tok[2]
        seq_lens, qsl = flat[:rows], flat[rows: 2 * rows + 1]
        tables = flat[2 * rows + 1:].reshape(rows, width)

        starts = np.empty(rows, dtype=np.int64)
        t = 0
        for i, item in enumerate(items):
            seq, q = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            known = min(start + q, seq.num_tokens)
            if q == 1:
                ids[t] = seq.token_ids[start]
            else:
                ids[t: t + known - start] = seq.token_ids[start:known]
                if known < start + q:  # speculative proposals ride after the known tokens
                    ids[t + known - start: t + q] = item.spec_token_ids
            starts[i] = start
            seq_lens[i] = start + q
            table = seq.block_table
            tables[i, : len(table)] = table
            tables[i, len(table):] = self.null_block
            t += q
        if rows > b:  # padding rows attend to their own pad_q (unwritten) slots
            ids[n:] = 0
            starts[b:] = 0
            seq_lens[b:] = pad_q
            tables[b:] = self.null_block
        all_q = np.full(rows, pad_q, dtype=np.int64)
        all_q[:b] = q_lens
        qsl[0] = 0
        np.cumsum(all_q, out=qsl[1:], dtype=np.int32)
        row_of_token = np.repeat(np.arange(rows), all_q)
        pos[:] = starts[row_of_token] + np.arange(total) - qsl[row_of_token]
        bs = self.block_size
        slots[:n] = tables[row_of_token[:n], pos[:n] // bs].astype(np.int64) * bs + pos[:n] % bs
        slots[n:] = -1
        return StepBatch(batch=batch, logits=logits, num_seqs=b, num_tokens=n, num_rows=rows,
                         query_len=pad_q if pad_to is not None else None,
                         max_query_len=max(q_lens), max_seq_len=int(seq_lens[:b].max()),
                         width=width, tokens=tokens, ints=ints)
