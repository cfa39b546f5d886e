"""Iteration-level continuous batching, with one rule (as in vLLM v1).

Every step, each scheduled sequence's computed tokens catch up toward its known tokens,
under a per-step token budget (`max_num_batched_tokens`) and a cap on running
sequences (`max_num_seqs`). That one rule covers everything:

- a new prompt is computed in chunks of at most the remaining budget (chunked prefill),
  and its chunks share a step with other sequences' decodes;
- a decoding sequence is one token behind (its last sampled token), so it takes one;
- a preempted sequence lost its KV and must recompute prompt + outputs, like a prompt;
- a speculating sequence also computes its k proposals (the budget counts them); when
  the pool or the budget cannot take them, the proposals are dropped, never another
  sequence preempted for them.

A new (or preempted) sequence first takes the longest prefix of full blocks already in
the pool (prefix caching), so only the rest is computed. A sequence migrated from another
engine brings its KV along (`carried_kv`): it takes blocks for those tokens too, the
engine writes the bytes in, and only its last token is computed.

With LoRA adapters, the running sequences use at most `max_loras` distinct adapters (the
device slots a step has): a waiting sequence whose adapter would be one too many is
passed over, in place, until a slot frees; those behind it may go first.

Running sequences are served first, oldest first. When the pool has no block left for
one, the newest running sequence of the lowest priority (the highest `priority` value,
vLLM's convention) is preempted (its blocks freed, recomputed later) until the older one
fits. Waiting sequences are admitted in priority order, FCFS within a priority, only
while their blocks are available and only in a step without preemption; a preempted
sequence goes back to the head of the queue, so nobody starves. With every priority
equal (the default) this is plain FCFS.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from raysvc.engine.block_manager import BlockManager
from raysvc.engine.sequence import Request, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed for it this step, its proposals included
    num_spec: int = 0  # of those, speculative proposals (the first num_spec of seq.proposal)

    @property
    def spec_token_ids(self) -> list[int]:
        return self.seq.proposal.tokens[: self.num_spec] if self.num_spec else []


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst)
    # sequences admitted with a carried KV, and the first of their blocks it fills (the
    # engine writes it before the forward pass)
    carried: list[tuple[Sequence, int]] = field(default_factory=list)
    # id(LoRA adapter) -> its device slot, for a step with adapters (ModelRunner sets it)
    lora_slots: dict[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
        max_loras: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found
        self.carried_tokens = 0  # tokens admitted with KV computed on another engine

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence behind every waiting one of the same or a better priority."""
        priority = seq.request.priority
        if not self.waiting or self.waiting[-1].request.priority <= priority:
            self.waiting.append(seq)  # the common case: O(1)
            return
        at = next(i for i, w in enumerate(self.waiting) if w.request.priority > priority)
        self.waiting.insert(at, seq)

    def _victim(self, first: int) -> Sequence:
        """The running sequence to preempt, among those not yet scheduled this step (from
        index `first` on): the newest of the lowest priority."""
        worst = max(range(first, len(self.running)),
                    key=lambda i: (self.running[i].request.priority, i))
        return self.running.pop(worst)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies, num_spec = None, 0
            if seq.proposal is not None:
                num_spec = min(len(seq.proposal.tokens), budget - n)
                if num_spec:
                    copies = self.block_manager.allocate_slots(seq, n, num_spec)
                if copies is None:
                    num_spec = 0
            while copies is None:
                copies = self.block_manager.allocate_slots(seq, n)
                if copies is None:
                    victim = self._victim(i)
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
            if copies is not None:
                out.block_copies += copies
                out.scheduled.append(ScheduledSeq(seq, n + num_spec, num_spec))
                budget -= n + num_spec
                i += 1

        adapters = {id(s.request.lora) for s in self.running if s.request.lora is not None}
        passed_over: list[Sequence] = []
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            seats = seq.request.params.n if seq.request.fork_pending else 1
            if len(self.running) + seats > self.max_num_seqs:
                break
            lora = id(seq.request.lora) if seq.request.lora is not None else None
            if lora is not None and lora not in adapters and len(adapters) >= self.max_loras:
                passed_over.append(self.waiting.popleft())
                continue
            cached = self.block_manager.find_cached_prefix(seq)
            num_cached = len(cached) * self.block_manager.block_size
            carried = seq.carried_kv.num_tokens - num_cached if seq.carried_kv else 0
            carried = max(carried, 0)  # what the cache holds already is not written again
            n = min(seq.num_tokens - num_cached - carried, budget)
            copies = self.block_manager.allocate_slots(seq, carried + n, cached=cached)
            if copies is None:
                break
            self.waiting.popleft()
            if lora is not None:
                adapters.add(lora)
            if self.block_manager.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_cached
            if carried:
                out.carried.append((seq, len(cached)))
                seq.num_computed_tokens += carried
                self.carried_tokens += carried
            else:
                seq.carried_kv = None  # the cache had all of it
            out.block_copies += copies
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(passed_over))
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's KV; it recomputes prompt + outputs when readmitted."""
        self.block_manager.free(seq)
        seq.carried_kv = None
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def add_forked(self, child: Sequence) -> None:
        """A sample forked from a running parent runs alongside it from the next step."""
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        """Release a finished sequence (its status already set)."""
        self.block_manager.free(seq)
        self.running.remove(seq)

    def abort(self, request: Request) -> None:
        for seq in request.seqs:
            self.stop(seq, "abort")
        request.fork_pending = False

    def stop(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End one sequence from outside (abort, or a stop string found by an ingress)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if not seq.is_finished:
            seq.finish(reason, stop_reason)
