"""`raysvc bench autoscale`'s arithmetic: the step load it offers and the worker-seconds
it charges each pool (the full benchmark starts three servers: docs/perf.md has its run)."""

from __future__ import annotations

import pytest

from raysvc.bench.autoscale import Run, arrivals, parse_phases


def test_phases_parse_and_refuse():
    assert parse_phases("0.5:60,8:40") == [(0.5, 60.0), (8.0, 40.0)]
    for bad in ("fast:60", "1:0", "-1:10", "1"):
        with pytest.raises(ValueError, match="--phases"):
            parse_phases(bad)


def test_step_load_rates_per_phase():
    phases = [(2.0, 500.0), (20.0, 100.0), (0.0, 50.0), (2.0, 500.0)]
    times = arrivals(phases, seed=1)
    assert times == sorted(times)
    count = lambda a, b: sum(a <= t < b for t in times)
    assert 900 < count(0, 500) < 1100  # Poisson(1000): within ~3 sigma
    assert 1850 < count(500, 600) < 2150
    assert count(600, 650) == 0
    assert 900 < count(650, 1150) < 1100 and max(times) < 1150
    assert arrivals(phases, seed=1) == times  # same seed, same load for every pool


def test_worker_seconds_integrate_held_workers():
    run = Run("x", samples=[(0.0, 1, 0, 0, 1), (10.0, 1, 2, 0, 3), (20.0, 3, 0, 0, 3),
                            (30.0, 2, 0, 1, 1), (40.0, 1, 0, 0, 1)])
    # 10 s x 1 + 10 s x 3 + 10 s x 3 + 10 s x 3 (a draining worker still holds its GPU)
    assert run.worker_seconds() == pytest.approx(10 + 30 + 30 + 30)
