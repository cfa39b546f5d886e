"""Requests and their sequences: the state the scheduler moves around.

A request with `n` samples starts as one sequence; when its prompt is computed it forks
into `n` sequences that share the prompt's KV blocks (copy-on-write for the last,
partly filled one).
"""

from __future__ import annotations

import enum
import itertools

import torch

from raysvc.engine.outputs import Logprob
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.spec.proposal import Proposal

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.priority = priority  # vLLM's: lower is scheduled first
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids |= set(eos_token_ids)
        self.seqs = [Sequence(self, 0)]
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.fork_pending = params.n > 1  # becomes n sequences once the prompt is computed
        self.bad_words_token_ids: list[list[int]] = []  # set by the engine (tokenized)
        self.grammar = None  # the compiled structured-output grammar, if any
        self.lora = None  # its LoRAAdapter (raysvc.models.lora), held for its whole life
        self.prompt_logprobs_sent = False  # a delta output hands them out once

    @property
    def finished(self) -> bool:
        return not self.fork_pending and all(s.status is SequenceStatus.FINISHED for s in self.seqs)


class Sequence:
    """One sample of a request: its tokens, KV blocks and decode state."""

    def __init__(self, request: Request, index: int, parent: Sequence | None = None) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        src = parent.token_ids if parent else request.prompt_token_ids
        self.token_ids: list[int] = list(src)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = parent.num_computed_tokens if parent else 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks, as known
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        # a migrated sequence's KV computed on another engine (kv_transfer.CarriedKV):
        # written into its blocks when it is admitted, so those tokens are not recomputed
        self.carried_kv = None
        # speculative decoding: this step's proposals, set and cleared by the speculative
        # decoder alone (the scheduler only chooses how many of them it runs)
        self.proposal: Proposal | None = None
        self.matcher = None  # where this sample stands in the request's grammar
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        seed = request.params.seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            # wrapped into a generator's seed range (SamplingParams allows up to 2**64 - 1)
            seed += index
            self.generator = torch.Generator().manual_seed(seed - 2 ** 64 if seed >= 2 ** 64
                                                           else seed)
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if request.params.logprobs is not None else None
        )
        self.cumulative_logprob = 0.0
        # incremental detokenization state (see detokenizer.py)
        self.text = ""
        self.num_emitted = 0  # output tokens handed out already (delta outputs)
        self.emitted_chars = 0  # characters of `text` handed out already
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
