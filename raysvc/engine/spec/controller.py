"""When to speculate, and how far: k from measured acceptance and measured step costs.

Speculation pays only while accepted tokens outrun what they cost. With per-position
acceptance rate α, k proposals yield E(k) = (1 - α^(k+1)) / (1 - α) tokens per sequence
per step. They cost a target step over B·(1+k) tokens instead of B, plus k draft rounds, plus
the verification itself (per sequence, on the host).
Both costs are measured online as lines (time = fixed + per-token · tokens, fitted by
exponentially decayed least squares), so the choice tracks the machine, the batch size
and the model pair: at batch 1 a step costs about the same for 1 or 5 tokens and
speculation wins; at a batch large enough to make the target compute-bound, the extra
tokens cost full price and k drops to 0 (off). While off, a probe step with k = 1 every
`PROBE_EVERY` steps keeps α and the draft cost fresh; exploration (before the costs are
known) and probes speculate on at most `PROBE_SEQS` sequences, so finding out that
speculation does not pay costs little.
"""

from __future__ import annotations

PROBE_EVERY = 50
PROBE_SEQS = 4  # exploring and probing speculate on this many sequences only: cheap


class LinearCost:
    """time ≈ fixed + slope · x, from decayed sums (recent steps weigh most)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, x: float, seconds: float) -> None:
        d = self.decay
        self.n = self.n * d + 1
        self.sx = self.sx * d + x
        self.sy = self.sy * d + seconds
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * seconds

    @property
    def ready(self) -> bool:
        return self.n >= 3

    def predict(self, x: float) -> float:
        det = self.n * self.sxx - self.sx * self.sx
        if det <= 1e-9 * max(self.n * self.sxx, 1e-30):  # one x seen so far: proportional
            return self.sy / max(self.sx, 1e-9) * x
        slope = max((self.n * self.sxy - self.sx * self.sy) / det, 0.0)
        fixed = max((self.sy - slope * self.sx) / self.n, 0.0)
        return fixed + slope * x


class SpecController:
    def __init__(self, k_max: int, adaptive: bool, disable_by_batch_size: int | None) -> None:
        self.k_max = k_max
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.target = LinearCost()  # one engine step vs tokens in it
        self.draft = LinearCost()  # one draft round vs sequences in it
        self.verify = LinearCost()  # verifying and appending vs speculating sequences
        self.accepted = 0.0  # decayed counts behind the acceptance-rate estimate
        self.rejected = 0.0
        self.steps_off = 0
        self.k = k_max
        self.exploring = False  # this step's k is a measurement, not a choice

    @property
    def alpha(self) -> float:
        """Per-position acceptance, estimated as accepted / (accepted + rejections)."""
        total = self.accepted + self.rejected
        return 0.7 if total < 1 else self.accepted / total

    def observe_verification(self, k: int, accepted: int) -> None:
        self.accepted = self.accepted * 0.995 + accepted
        self.rejected = self.rejected * 0.995 + (accepted < k)

    def choose_k(self, num_seqs: int, other_tokens: int) -> int:
        """k for this step's `num_seqs` decoding sequences (0 = plain decoding)."""
        self.exploring = False
        if num_seqs == 0 or (self.disable_by_batch_size is not None
                             and num_seqs >= self.disable_by_batch_size):
            return 0
        if not self.adaptive:
            self.k = self.k_max
            return self.k
        if not (self.target.ready and self.draft.ready and self.verify.ready):
            self.exploring = True
            self.k = self.k_max
            return self.k
        a = min(self.alpha, 0.999)
        best_k = 0
        best_rate = num_seqs / self.target.predict(other_tokens + num_seqs)
        for k in range(1, self.k_max + 1):
            tokens = num_seqs * (1 - a ** (k + 1)) / (1 - a)
            time = self.target.predict(other_tokens + num_seqs * (1 + k)) + \
                k * self.draft.predict(num_seqs) + self.verify.predict(num_seqs)
            if tokens / time > best_rate:
                best_k, best_rate = k, tokens / time
        if best_k == 0:
            self.steps_off += 1
            if self.steps_off % PROBE_EVERY == 0:
                best_k = 1
                self.exploring = True
        else:
            self.steps_off = 0
        self.k = best_k
        return best_k
