"""The adaptive controller's arithmetic against hand-computed expectations: the cost
lines it fits, the per-position acceptance it estimates, and the k it then picks."""

from __future__ import annotations

import pytest

from raysvc.engine.spec.controller import PROBE_EVERY, SpecController, StepCost


def test_step_cost_follows_flat_then_linear_and_extrapolates():
    cost = StepCost()
    # launch-bound up to 64 tokens (1 ms), then 20 µs per token beyond
    def secs(x):
        return 1e-3 + 2e-5 * max(x - 64, 0)

    for x in [1, 4, 16, 64, 128, 512, 16, 4]:
        cost.observe(x, secs(x))
    assert cost.ready
    for x in [2, 16, 40, 64, 300, 512]:
        assert cost.predict(x) == pytest.approx(secs(x), rel=1e-6), x
    assert cost.predict(2048) == pytest.approx(secs(2048), rel=1e-6)  # past the last class
    one = StepCost()
    for _ in range(3):
        one.observe(4, 0.004)
    assert one.predict(8) == pytest.approx(0.008)  # one size seen: in proportion
    assert one.predict(8, shape=cost) == pytest.approx(0.004)  # ... or shaped like another


def test_step_cost_forgets_per_size_class():
    cost = StepCost(decay=0.5)
    for _ in range(20):
        cost.observe(16, 1.0)
    cost.observe(64, 2.0)
    for _ in range(20):
        cost.observe(16, 3.0)  # the 16-class moves; the 64-class keeps its one sample
    assert cost.predict(16) == pytest.approx(3.0, rel=1e-4)
    assert cost.predict(64) == pytest.approx(3.0, rel=1e-4)  # non-decreasing: clamped


def _controller(per_token: float, draft: float, acceptance: list[float], k_max: int = 4):
    """A controller whose measurements say: a target step costs 1 + per_token·tokens,
    a draft round `draft`, verification nothing; position i is accepted with the given
    cumulative chances."""
    c = SpecController(k_max, adaptive=True, disable_by_batch_size=None)
    for tokens in (1, 5, 16, 64):
        c.target.observe(tokens, 1.0 + per_token * tokens)
        c.draft.observe(tokens, draft)
        c.verify.observe(tokens, 0.0)
    n = 1000  # as if 1000 verifications at k_max had shown these cumulative rates
    for i, a in enumerate(acceptance):
        c.drafted[i] = float(n)
        c.accepted[i] = n * a
    return c


def test_acceptance_is_measured_per_position():
    c = _controller(0.0, 0.1, [0.8, 0.5, 0.2, 0.1])
    assert c.acceptance() == pytest.approx([0.8, 0.5, 0.2, 0.1])
    # observed verifications move the counts: k=2 proposals, 1 accepted
    fresh = SpecController(3, True, None)
    for _ in range(10):
        fresh.observe_verification(2, 1)
    a = fresh.acceptance()
    assert a[0] == pytest.approx(1.0) and a[1] == pytest.approx(0.0) and a[2] == 0.0


def test_k_maximises_expected_tokens_per_second():
    # step 1.0 regardless of tokens, draft round 0.1: E(k)/(1 + 0.1k) with the rates below
    # k=0: 1, k=1: 1.8/1.1=1.636, k=2: 2.3/1.2=1.917, k=3: 2.5/1.3=1.923, k=4: 2.6/1.4=1.857
    c = _controller(0.0, 0.1, [0.8, 0.5, 0.2, 0.1])
    assert c.choose_k(num_seqs=1, other_tokens=0) == 3
    # a geometric rate fitted to the same data would have misjudged it; a dear draft
    # round (0.5) makes only the first, likely proposal worth it: k=1: 1.8/1.5=1.2 best
    assert _controller(0.0, 0.5, [0.8, 0.5, 0.2, 0.1]).choose_k(1, 0) == 1


def test_compute_bound_batches_switch_off_and_probe():
    # compute-bound: 64 tokens cost 4x the fixed part, so extra tokens cost nearly full
    # price (plain: 64/5 = 12.8 tokens/s; k=1: 64·1.6/(1 + 8 + 0.05) = 11.3)
    c = _controller(4 / 64, 0.05, [0.6, 0.35, 0.2, 0.1])
    ks = [c.choose_k(num_seqs=64, other_tokens=0) for _ in range(PROBE_EVERY)]
    assert ks[:-1] == [0] * (PROBE_EVERY - 1)
    assert ks[-1] == 4 and c.exploring  # the probe speculates with the largest k
    assert c.choose_k(64, 0) == 0 and not c.exploring
    # each probe that confirms "off" doubles the wait for the next
    ks = [c.choose_k(64, 0) for _ in range(2 * PROBE_EVERY - 1)]
    assert ks[:-1] == [0] * (2 * PROBE_EVERY - 2) and ks[-1] == 4


def test_fixed_and_disabled():
    fixed = SpecController(3, adaptive=False, disable_by_batch_size=8)
    assert fixed.choose_k(1, 0) == 3
    assert fixed.choose_k(8, 0) == 0  # disable_by_batch_size
    unknown = SpecController(3, adaptive=True, disable_by_batch_size=None)
    assert unknown.choose_k(2, 0) == 3 and unknown.exploring  # costs not measured yet


def test_step_cost_below_the_smallest_size_stays_positive():
    cost = StepCost()
    cost.observe(10, 1.0)
    cost.observe(20, 3.0)  # steep: the line through both reaches 0 at x = 5
    assert cost.predict(2) == pytest.approx(0.2)  # proportional floor
    assert cost.predict(8) == pytest.approx(0.8)
    assert cost.predict(15) == pytest.approx(2.0)


def test_probes_take_a_bounded_share_of_the_time_off():
    now = [0.0]
    c = _controller(4 / 64, 0.05, [0.6, 0.35, 0.2, 0.1])
    c.clock = lambda: now[0]
    ks = []
    for _ in range(PROBE_EVERY):
        ks.append(c.choose_k(64, 0))
        now[0] += 0.001  # plain steps take 1 ms ...
    assert ks[-1] == 4
    now[0] += 0.5  # ... the probe step took half a second
    steps = 0
    while c.choose_k(64, 0) == 0:
        now[0] += 0.001
        steps += 1
    # at most 5% of the time probing: 0.5 s of probe needs >= 10 s off (not 2 x 50 steps)
    assert steps >= 10_000 - 1
