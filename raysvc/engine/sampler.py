"""Turn one row of logits per sequence into its next token.

Order, as in vLLM: (grammar mask, applied by the engine) -> raw logprobs (reported to the
user) -> allowed token ids, bad words, logit bias -> penalties -> min_tokens suppression
-> greedy argmax, or temperature -> top_k -> top_p -> min_p -> sample.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws
exactly from p. A seeded sequence draws E from its own generator, so its output does not
depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raysvc.engine.outputs import Logprob
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.sequence import Sequence


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    # rows whose sampling raised when run alone: that row's request failed, not the batch
    failed: dict[int, Exception] = field(default_factory=dict)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]  # logits: [num_seqs, vocab] fp32
    ) -> SampleResult:
        """One token per row. Should the batch raise, each row is sampled alone, so one
        request's bad parameters fail that request (`failed`) and no other."""
        try:
            return self._sample_rows(logits, seqs)
        except Exception as batch_error:
            if len(seqs) == 1:
                return SampleResult([-1], [None], {0: batch_error})
            result = SampleResult([], [])
            for row, seq in enumerate(seqs):
                try:
                    one = self._sample_rows(logits[row: row + 1], [seq])
                except Exception as e:
                    one = SampleResult([-1], [None], {0: e})
                result.token_ids += one.token_ids
                result.logprobs += one.logprobs
                if one.failed:
                    result.failed[row] = one.failed[0]
            return result

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        logits = logits[:, : self.vocab_size].float()
        params = [s.request.params for s in seqs]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        processed = [i for i, (p, s) in enumerate(zip(params, seqs, strict=True))
                     if p.needs_processing or p.needs_penalties or s.request.bad_words_token_ids]
        if processed:
            logits = logits.clone()
            for row in processed:
                process(logits[row: row + 1], seqs[row])
                if params[row].needs_penalties:
                    _apply_penalties(logits[row], seqs[row])
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.request.params.min_tokens and seq.request.stop_token_ids:
                logits[row, list(seq.request.stop_token_ids)] = float("-inf")

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            tokens[random_rows] = self._sample(logits[random_rows], [seqs[i] for i in random_rows])
        token_list = tokens.tolist()
        if raw_logprobs is not None:
            raw_logprobs = raw_logprobs.cpu()

        logprobs: list[dict[int, Logprob] | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for row, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[row] = top_logprobs(raw_logprobs[row], token_list[row], p.logprobs)
        return SampleResult(token_list, logprobs)

    def probabilities(
        self, logits: torch.Tensor, params: list[SamplingParams]  # logits: [rows, vocab]
    ) -> torch.Tensor:  # [rows, vocab], each row sums to 1
        """The distribution a non-greedy request samples from: temperature, top-k, top-p,
        min-p. Speculative decoding verifies against exactly this distribution."""
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        logits = logits[:, : self.vocab_size].float() / temps
        top_ks = [min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size
                  for p in params]
        top_ps = [p.top_p for p in params]
        if min(top_ks) < self.vocab_size or min(top_ps) < 1.0:
            logits = _top_k_top_p(logits, torch.tensor(top_ks, device=dev),
                                  torch.tensor(top_ps, device=dev))
        probs = torch.softmax(logits, dim=-1)
        min_ps = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
        if bool((min_ps > 0).any()):
            probs = probs.masked_fill(probs < min_ps * probs.max(dim=-1, keepdim=True).values, 0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row from `probs` [rows, vocab]: the exponential race, with each
        seeded sequence's own generator."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            noise[unseeded] = noise[unseeded].exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=s.generator)
        return (probs / noise).argmax(dim=-1)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        return self.draw(self.probabilities(logits, [s.request.params for s in seqs]), seqs)


def process(logits: torch.Tensor, seq: Sequence) -> None:
    """The request's allowed token ids, bad words and logit bias, in place on its logits
    rows [rows, vocab] (a verification's k + 1 rows share them: none depends on the
    position, except bad words, whose sequences do not speculate)."""
    p = seq.request.params
    if p.allowed_token_ids is not None:
        allowed = torch.tensor(p.allowed_token_ids, device=logits.device)
        keep = logits[:, allowed]
        logits.fill_(float("-inf"))
        logits[:, allowed] = keep
    if seq.request.bad_words_token_ids:
        out = seq.output_token_ids
        banned = [w[-1] for w in seq.request.bad_words_token_ids  # a word one token from done
                  if len(out) >= len(w) - 1 and out[len(out) - len(w) + 1:] == w[:-1]]
        if banned:
            logits[:, banned] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        logits[:, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device,
                                       dtype=logits.dtype)


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:  # logits: [vocab], in place
    p = seq.request.params
    vocab = logits.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                   vals * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _top_k_top_p(
    logits: torch.Tensor,  # [rows, vocab]
    top_k: torch.Tensor,  # [rows] int
    top_p: torch.Tensor,  # [rows] float
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def top_logprobs(row: torch.Tensor, token: int, n: int) -> dict[int, Logprob]:
    chosen = float(row[token])
    result = {token: Logprob(chosen, int((row > row[token]).sum()) + 1)}
    if n:
        values, ids = row.topk(n)
        for rank, (tid, lp) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), 1):
            result.setdefault(tid, Logprob(lp, rank))
    return result
