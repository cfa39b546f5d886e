"""Speculative decoding inside the engine step: propose before scheduling, verify after.

Only sequences in plain decode (one token behind) and whose sampling needs nothing
position-dependent (no penalties, logprobs, min_tokens or bad words) speculate; the rest
of the batch decodes normally in the same step. A grammar and a logit bias apply to every
verified row alike (the engine masks them before verification).
"""

from __future__ import annotations

import time

import torch

from raysvc.engine.sampler import Sampler
from raysvc.engine.sequence import Sequence, SequenceStatus
from raysvc.engine.spec.config import SpeculativeConfig
from raysvc.engine.spec.controller import PROBE_SEQS, SpecController
from raysvc.engine.spec.proposal import Proposal
from raysvc.engine.spec.rejection import verify_greedy, verify_sampled


def eligible(seq: Sequence) -> bool:
    p = seq.request.params
    return (seq.status is SequenceStatus.RUNNING and not seq.request.fork_pending
            and seq.num_computed_tokens == seq.num_tokens - 1
            and not p.needs_penalties and p.logprobs is None and p.min_tokens == 0
            and not p.bad_words)


def pad_proposals(seqs: list[Sequence], ks: list[int]) -> None:
    """Give every sequence as many proposals as the longest one has (within its room), so
    the verification step is uniform and replays a CUDA graph instead of running eagerly.
    A pad repeats the last token: a deterministic guess (one-hot q), verified like any
    proposal, so the output distribution is unchanged; a guess that happens to be right
    is a free token. Sequences whose proposals carry draft probabilities are not padded
    (their pads would need a q), nor does padding reach past a sequence's room."""
    k = max((len(s.proposal.tokens) for s in seqs if s.proposal is not None), default=0)
    for seq, room in zip(seqs, ks, strict=True):
        proposal = seq.proposal or Proposal([], None)
        have = len(proposal.tokens)
        if have < k <= room and proposal.probs is None:
            last = proposal.tokens[-1] if have else seq.token_ids[-1]
            seq.proposal = Proposal(proposal.tokens + [last] * (k - have), None)


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.controller = SpecController(config.num_speculative_tokens, config.adaptive,
                                         config.disable_by_batch_size)
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.verifications = 0
        self.accepted_per_position = [0] * config.num_speculative_tokens
        self.drafted_per_position = [0] * config.num_speculative_tokens
        # Steps replay CUDA graphs only when every sequence brings the same number of
        # tokens: then probes take every sequence, and short proposals are padded (set
        # by the engine once it has captured graphs).
        self.uniform = False
        self._proposed: list[Sequence] = []  # the sequences given proposals this step

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Attach proposals (`seq.proposal`) to eligible sequences; they live one step:
        `verify` or `end_step` takes them away."""
        seqs = [s for s in running if eligible(s)]
        other = len(running) - len(seqs)
        k = self.controller.choose_k(len(seqs), other)
        if k == 0:
            return
        if self.controller.exploring and not self.uniform:
            seqs = seqs[:PROBE_SEQS]
        ks = []
        for s in seqs:
            room = min(max_model_len - s.num_tokens,
                       s.request.params.max_tokens - s.num_output_tokens - 1)
            ks.append(max(min(k, room), 0))
        seqs = [s for s, n in zip(seqs, ks, strict=True) if n > 0]
        ks = [n for n in ks if n > 0]
        if not seqs:
            return
        start = time.perf_counter()
        proposals = self.proposer.propose(seqs, ks)
        # proposing costs time whatever the proposer (a model's rounds, or an n-gram search)
        self.controller.draft.observe(len(seqs), (time.perf_counter() - start) / max(ks))
        for seq, proposal in zip(seqs, proposals, strict=True):
            if proposal is not None and proposal.tokens:
                seq.proposal = proposal
        self._proposed = seqs
        if self.uniform:
            pad_proposals(seqs, ks)

    def verify(self, seq: Sequence, k: int, logits: torch.Tensor, sampler: Sampler) -> list[int]:
        """Verify the first k proposals the step ran. logits: [k + 1, vocab] at the
        positions of the last token and the k proposals. Returns the accepted proposals plus
        one recovered or bonus token."""
        draft = seq.proposal.tokens[:k]
        probs = seq.proposal.probs[:k] if seq.proposal.probs is not None else None
        params = seq.request.params
        if params.greedy:
            tokens = verify_greedy(logits, draft)
        else:
            p = sampler.probabilities(logits, [params] * logits.shape[0])
            tokens = verify_sampled(p, draft, probs, seq.generator)
        accepted = len(tokens) - 1
        self.draft_tokens += len(draft)
        self.accepted_tokens += accepted
        self.verifications += 1
        for i in range(len(draft)):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < accepted
        self.controller.observe_verification(len(draft), accepted)
        seq.proposal = None
        return tokens

    def end_step(self) -> None:
        """Proposals the step did not verify (no room in the budget or the pool, or their
        sequence was preempted) are dropped: the next step proposes afresh."""
        for seq in self._proposed:
            seq.proposal = None
        self._proposed = []

    def observe_step(self, num_tokens: int, seconds: float, num_verified: int,
                     verify_seconds: float) -> None:
        """A step's forward pass (+ plain sampling) and, apart, its verification work."""
        self.controller.target.observe(num_tokens, seconds)
        if num_verified:
            self.controller.verify.observe(num_verified, verify_seconds)

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def stats(self) -> dict:
        return {
            "spec_num_drafts": self.verifications,  # sequences x steps that speculated
            "spec_draft_tokens": self.draft_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_acceptance_rate": self.accepted_tokens / max(self.draft_tokens, 1),
            # tokens emitted per verification: accepted proposals + the recovered/bonus one
            "spec_mean_accepted_length": 1 + self.accepted_tokens / max(self.verifications, 1),
            "spec_acceptance_per_position": [
                a / d if d else None
                for a, d in zip(self.accepted_per_position, self.drafted_per_position,
                                strict=True)],
            "spec_accepted_tokens_per_position": list(self.accepted_per_position),
            "spec_num_speculative_tokens": self.controller.k,
        }
