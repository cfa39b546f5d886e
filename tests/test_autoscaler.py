"""The worker pool's scaling policy, as a pure function of signals and time (no Ray).

A simulated clock drives `ScalingPolicy.decide` once per second with chosen loads; the
expected targets are worked out by hand from the policy's definition (demand in workers'
worth of seats or KV blocks, sustained over the upscale delay, peaking over the downscale
delay, never below the admitted work, clamped).
"""

from __future__ import annotations

import random

import pytest

from raysvc.cluster.autoscaler import AutoscalingConfig, PoolSignals, ScalingPolicy

SEATS, BLOCKS = 16, 1000  # per worker; default target_ongoing_requests = 8


def signals(now, current, queued=0, running=0, used_blocks=0, queued_blocks=0):
    return PoolSignals(now=now, queued_seqs=queued, queued_blocks=queued_blocks,
                       running_seqs=running, used_blocks=used_blocks, seats_per_worker=SEATS,
                       blocks_per_worker=BLOCKS, current=current)


def policy(lo=1, hi=8, **knobs):
    cfg = AutoscalingConfig.parse({"upscale_delay_s": 5, "downscale_delay_s": 20,
                                   "look_back_period_s": 1, **knobs})
    return ScalingPolicy(cfg, lo, hi)


def run(p, seconds, start, current, follow=True, **load):
    """Decide once per second; with `follow`, the pool reaches each target at once."""
    decisions = []
    for t in range(start, start + seconds):
        d = p.decide(signals(t, current, **load))
        decisions.append(d)
        if follow:
            current = d.target
    return decisions, current


def test_burst_scales_up_at_the_end_of_the_upscale_delay_and_not_before():
    p = policy()
    _, current = run(p, 30, 0, 1, running=4)  # quiet: half of one worker's target
    assert current == 1
    # burst: 40 seats queued + 8 running = 48 seats = 6 workers' worth at 8 per worker
    decisions, current = run(p, 8, 30, current, running=8, queued=40)
    targets = [d.target for d in decisions]
    assert targets[:5] == [1] * 5, targets  # t = 30..34: not yet sustained for 5 s
    assert targets[5] == 6, decisions[5]  # t = 35: sustained for 5 s -> 6 workers
    assert "sustained" in decisions[5].reason


def test_spike_shorter_than_the_upscale_delay_moves_nothing():
    p = policy()
    run(p, 30, 0, 2, running=16)  # two workers' worth
    spike, current = run(p, 3, 30, 2, running=16, queued=60)
    after, current = run(p, 40, 33, current, running=16)
    assert all(d.target == 2 for d in spike + after), [d.target for d in spike + after]


def test_lull_shorter_than_the_downscale_delay_keeps_the_pool():
    p = policy()
    _, current = run(p, 30, 0, 4, running=32)  # 4 workers' worth: stays 4
    assert current == 4
    lull, current = run(p, 15, 30, current, running=0)  # 15 s < 20 s downscale delay
    assert {d.target for d in lull} == {4}
    back, current = run(p, 30, 45, current, running=32)
    assert {d.target for d in back} == {4}


def test_quiet_for_the_downscale_delay_shrinks_to_the_window_peak():
    p = policy()
    _, current = run(p, 30, 0, 4, running=32)
    # from t=30, 12 seats (1.5 workers' worth): down to 2 once the window holds no more
    decisions, current = run(p, 40, 30, current, running=12)
    first = next(d for d in decisions if d.target < 4)
    assert first.time == 50 and first.target == 2, first  # 20 s of peaks <= 1.5
    assert current == 2 and "peak" in first.reason


def test_steady_noisy_load_never_flaps():
    rng = random.Random(0)
    p = policy()
    current, targets = 3, []
    for t in range(600):  # 2.8 .. 3.2 workers' worth: ceil flickers between 3 and 4
        d = p.decide(signals(t, current, running=rng.randint(22, 26)))
        current = d.target
        targets.append(current)
    changes = sum(a != b for a, b in zip(targets, targets[1:], strict=False))
    assert changes <= 1, targets  # at most the one step up to 4, never back and forth


def test_clamped_to_min_and_max():
    p = policy(lo=2, hi=3)
    up, _ = run(p, 10, 0, 2, queued=500)
    assert max(d.target for d in up) == 3 and "clamped" in up[-1].reason
    p = policy(lo=2, hi=3)
    down, _ = run(p, 60, 0, 3)
    assert down[-1].target == 2 and min(d.target for d in down) == 2


def test_never_below_what_admitted_work_needs():
    # 30 seats running on 4 workers of 16: they must fit in ceil(30/16) = 2 workers, so a
    # target_ongoing_requests of 1000 (demand worth 0.03 workers) still keeps 2
    p = policy(target_ongoing_requests=1000)
    decisions, current = run(p, 60, 0, 4, running=30)
    assert current == 2 and decisions[-1].target == 2
    assert "admitted" in next(d for d in decisions if d.target == 2).reason
    # and KV blocks: 2500 blocks in use need 3 pools of 1000 (at a full target usage)
    p = policy(target_ongoing_requests=1000, target_kv_usage=1.0)
    _, current = run(p, 60, 0, 4, running=3, used_blocks=2500)
    assert current == 3


def test_kv_pressure_scales_up_without_many_seats():
    p = policy()
    # 4 long requests (4 seats: half a worker) hold 2400 blocks: 2400 / (0.8*1000) = 3
    _, current = run(p, 10, 0, 1, running=4, used_blocks=2400)
    assert current == 3


def test_smoothing_factors_damp_each_step():
    p = policy(upscaling_factor=0.5, downscaling_factor=0.5)
    d, _ = run(p, 6, 0, 1, follow=False, queued=64)  # 8 workers' worth from 1
    assert d[5].target == 1 + 4  # ceil(7 * 0.5)
    p = policy(upscaling_factor=0.5, downscaling_factor=0.5)
    d, _ = run(p, 25, 0, 8, follow=False)  # idle: to min 1 from 8, half the way
    assert d[-1].target == 8 - 4  # ceil(7 * 0.5)


def test_starting_workers_count_as_capacity():
    p = policy()
    # demand worth 3 workers, 1 ready + 2 starting: current = 3 -> nothing more
    decisions, _ = run(p, 10, 0, 3, follow=False, queued=16, running=8)
    assert {d.target for d in decisions} == {3}


@pytest.mark.parametrize("knobs, field", [
    ({"upscale_delay_s": -1}, "upscale_delay_s"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
    ({"downscale_delay_s": "soon"}, "downscale_delay_s"),
    ({"look_back_period_s": True}, "look_back_period_s"),
    ({"target_kv_usage": 1.5}, "target_kv_usage"),
    ({"upscale_delay": 3}, "upscale_delay"),
])
def test_bad_knobs_are_refused_naming_them(knobs, field):
    with pytest.raises(ValueError, match=f"worker_autoscaling.{field}"):
        AutoscalingConfig.parse(knobs)


def test_knobs_accept_json_integers():
    cfg = AutoscalingConfig.parse({"upscale_delay_s": 3, "target_ongoing_requests": 4})
    assert cfg.upscale_delay_s == 3.0 and cfg.target_ongoing_requests == 4.0


def test_min_above_max_refused():
    with pytest.raises(ValueError, match="min_workers"):
        ScalingPolicy(AutoscalingConfig(), 3, 2)
