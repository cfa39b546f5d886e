"""When to speculate, and how far: k from measured acceptance and measured step costs.

Speculation pays only while accepted tokens outrun what they cost. k proposals yield
E(k) = 1 + a_1 + ... + a_k tokens per sequence per step, where a_i is the measured chance
that the first i proposals are all accepted (counted per position: a draft's first guess
is right far more often than its fourth, so one geometric rate would misjudge small k).
They cost a target step over B·(1+k) tokens instead of B, plus k draft rounds, plus
the verification itself (per sequence, on the host).
Both costs are measured online as lines (time = fixed + per-token · tokens, fitted by
exponentially decayed least squares), so the choice tracks the machine, the batch size
and the model pair: at batch 1 a step costs about the same for 1 or 5 tokens and
speculation wins; at a batch large enough to make the target compute-bound, the extra
tokens cost full price and k drops to 0 (off). While off, a probe step with the largest
k every `PROBE_EVERY` steps keeps the acceptance and the draft cost fresh; exploration
(before the costs are known) and probes speculate on at most `PROBE_SEQS` sequences, so
finding out that speculation does not pay costs little.
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
        # decayed counts per position i: proposals drafted there, and accepted up to there
        self.drafted = [0.0] * k_max
        self.accepted = [0.0] * k_max
        self.steps_off = 0
        self.k = k_max
        self.exploring = False  # this step's k is a measurement, not a choice

    def acceptance(self) -> list[float]:
        """a_i for i = 1..k_max: the chance that proposals 1..i are all accepted. A position
        with too few measurements continues the one before it geometrically."""
        out: list[float] = []
        prev, ratio = 1.0, 0.7
        for drafted, accepted in zip(self.drafted, self.accepted, strict=True):
            if drafted >= 2:
                a = min(accepted / drafted, prev)
                ratio = a / prev if prev > 0 else 0.0
            else:
                a = prev * ratio
            out.append(a)
            prev = a
        return out

    def observe_verification(self, k: int, accepted: int) -> None:
        for i in range(k):
            self.drafted[i] = self.drafted[i] * 0.995 + 1
            self.accepted[i] = self.accepted[i] * 0.995 + (i < accepted)

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
        best_k = 0
        best_rate = num_seqs / self.target.predict(other_tokens + num_seqs)
        expected = 1.0
        for k, a in enumerate(self.acceptance(), start=1):
            expected += a
            time = self.target.predict(other_tokens + num_seqs * (1 + k)) + \
                k * self.draft.predict(num_seqs) + self.verify.predict(num_seqs)
            if num_seqs * expected / time > best_rate:
                best_k, best_rate = k, num_seqs * expected / time
        if best_k == 0:
            self.steps_off += 1
            if self.steps_off % PROBE_EVERY == 0:
                best_k = self.k_max
                self.exploring = True
        else:
            self.steps_off = 0
        self.k = best_k
        return best_k
