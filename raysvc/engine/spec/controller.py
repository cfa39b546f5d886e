"""When to speculate, and how far: k from measured acceptance and measured step costs.

Speculation pays only while accepted tokens outrun what they cost. k proposals yield
E(k) = 1 + a_1 + ... + a_k tokens per sequence per step, where a_i is the measured chance
that the first i proposals are all accepted (counted per position: a draft's first guess
is right far more often than its fourth, so one geometric rate would misjudge small k).
They cost a target step over B·(1+k) tokens instead of B, plus k draft rounds, plus the
verification itself (per sequence, on the host). All costs are measured online as curves
over the step's size (`StepCost`), so the choice tracks the machine, the batch size and
the model pair: where a step costs about the same for 1 or 5 tokens per sequence (a GPU
at small batches) speculation wins; where the target is compute-bound (large batches, or
a CPU), the extra tokens cost full price and k drops to 0 (off). While off, a probe step
with the largest k keeps the acceptance and the costs fresh, `PROBE_EVERY` steps after
turning off and then ever more rarely while it stays off (and never taking more than
`PROBE_TIME_SHARE` of the time: a probe step can cost many plain ones). Exploration
(before the costs are known) and probes speculate on at most `PROBE_SEQS` sequences, so
finding out that speculation does not pay costs little — except where steps replay CUDA
graphs: there a step must be uniform to be cheap, so probes take every sequence (the
decoder decides).
"""

from __future__ import annotations

import time

PROBE_EVERY = 50  # steps off before the first probe; doubles after each probe that
MAX_PROBE_EVERY = 1600  # confirms off (to this), back to PROBE_EVERY once speculation pays
PROBE_SEQS = 4  # exploring and probing speculate on this many sequences only: cheap
PROBE_TIME_SHARE = 0.05  # and probes take at most this share of the time spent off


class StepCost:
    """Seconds a step takes as a function of its size x (tokens, or sequences): piecewise
    linear through the recent mean of each size class (powers of two), non-decreasing.

    One line fitted over all steps cannot describe both regimes a step lives in: flat
    while the device waits on launches or weight reads, linear once it computes; and while
    speculation is off, the sizes it would need are never seen, so the curve is
    extrapolated from the nearest observed sizes. Each size class forgets at its own pace
    (`decay` per observation of that class), so rare sizes keep their last estimate.
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.count = 0
        self.classes: dict[int, list[float]] = {}  # size class -> [weight, sum x, sum secs]

    def observe(self, x: float, seconds: float) -> None:
        c = self.classes.setdefault(max(int(x), 1).bit_length(), [0.0, 0.0, 0.0])
        d = self.decay
        c[0], c[1], c[2] = c[0] * d + 1, c[1] * d + x, c[2] * d + seconds
        self.count += 1

    @property
    def ready(self) -> bool:
        return self.count >= 3

    def points(self) -> list[tuple[float, float]]:
        return [(sx / w, sy / w) for _, (w, sx, sy) in sorted(self.classes.items())]

    def predict(self, x: float, shape: StepCost | None = None) -> float:
        """With one size class seen so far: scaled like `shape` if given, else in
        proportion to x (the pessimistic guess)."""
        pts = self.points()
        if not pts:
            return 0.0
        if len(pts) == 1:
            x0, y0 = pts[0]
            if shape is not None and len(shape.points()) > 1:
                return y0 * shape.predict(x) / max(shape.predict(x0), 1e-12)
            return y0 * x / max(x0, 1e-12)
        i = 1
        while i < len(pts) - 1 and x > pts[i][0]:
            i += 1
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        slope = max((y1 - y0) / max(x1 - x0, 1e-12), 0.0)
        if x < x0:  # below every size seen: no less than in proportion to the smallest
            return max(y0 + slope * (x - x0), y0 * x / max(x0, 1e-12))
        return y0 + slope * (x - x0)


class SpecController:
    def __init__(self, k_max: int, adaptive: bool, disable_by_batch_size: int | None,
                 clock=time.perf_counter) -> None:
        self.k_max = k_max
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.target = StepCost()  # one engine step vs tokens in it
        self.draft = StepCost()  # one draft round vs sequences in it
        self.verify = StepCost()  # verifying and appending vs speculating sequences
        # decayed counts per position i: proposals drafted there, and accepted up to there
        self.drafted = [0.0] * k_max
        self.accepted = [0.0] * k_max
        self.steps_off = 0
        self.probe_every = PROBE_EVERY
        self.clock = clock
        self.probe_started: float | None = None  # a probe step is running since
        self.probe_cost = 0.0  # seconds the last probe step took
        self.probe_ended = 0.0
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
        now = self.clock()
        if self.probe_started is not None:  # the previous step was a probe: it is done
            self.probe_cost, self.probe_ended = now - self.probe_started, now
            self.probe_started = None
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
        best_rate = num_seqs / max(self.target.predict(other_tokens + num_seqs), 1e-9)
        expected = 1.0
        for k, a in enumerate(self.acceptance(), start=1):
            expected += a
            # a draft round is a decode step too: until seen at this batch size, its cost
            # scales like the target's
            time = self.target.predict(other_tokens + num_seqs * (1 + k)) + \
                k * self.draft.predict(num_seqs, shape=self.target) + \
                self.verify.predict(num_seqs)
            rate = num_seqs * expected / max(time, 1e-9)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0:
            self.steps_off += 1
            if self.steps_off >= self.probe_every and \
                    now - self.probe_ended >= self.probe_cost / PROBE_TIME_SHARE:
                best_k = self.k_max
                self.exploring = True
                self.steps_off = 0
                self.probe_every = min(self.probe_every * 2, MAX_PROBE_EVERY)
                self.probe_started = now
        else:
            self.steps_off = 0
            self.probe_every = PROBE_EVERY
        self.k = best_k
        return best_k
