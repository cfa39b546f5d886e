"""How many workers the pool should have: a pure policy over the router's signals.

The router sees what no replica-level autoscaler does — the global queue, every seat it
admitted on every worker, every worker's KV blocks — so demand is measured in the units a
worker's capacity is made of:

- **seats**: sequences admitted to workers and not released, plus those waiting in the
  router's queue, against `target_ongoing_requests` per worker;
- **KV blocks**: blocks the admitted and queued requests hold or will hold, against
  `target_kv_usage` of a worker's pool (long prompts fill a worker's memory long before
  its batch slots).

`raw(t) = max(seats / target_ongoing_requests, blocks / (target_kv_usage * pool))` is the
number of workers the load at time t is worth; each sample is averaged over
`look_back_period_s`. Hysteresis comes from two windows, so neither a spike nor a lull
moves the pool and a steady load never flaps:

- scale **up** to the demand *sustained* over the last `upscale_delay_s` (the window's
  minimum): a burst that lasts the delay grows the pool at its end;
- scale **down** to the demand's *peak* over the last `downscale_delay_s` (the window's
  maximum): the pool shrinks only to what the busiest moment of that window needed.

`upscaling_factor` / `downscaling_factor` damp each step (Ray Serve's names and meaning).
The target never drops below what the work admitted right now needs (its seats and
blocks must fit in the workers that stay), and is clamped to [min_workers, max_workers].

Defaults, and why (LLM traffic is not Serve's default traffic):
- `target_ongoing_requests` = half a worker's `max_num_seqs`: a decode batch that size
  keeps the GPU well used while leaving room for the next burst's prefills; Serve's
  default of 2 would buy a GPU per two streams.
- `upscale_delay_s` = 10 (Serve: 30): a new worker takes tens of seconds to minutes to
  load its model, so a real burst must start one early; 10 s still ignores a spike.
- `downscale_delay_s` = 300 (Serve: 600): a GPU node released too eagerly costs a cold
  start on the next peak; five quiet minutes is evidence enough.
- `look_back_period_s` = 5: seats are exact counts, not sampled replica metrics, so a
  short average is enough to smooth a single admission wave.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

_EPS = 1e-9


class AutoscalingConfig(BaseModel):
    """The policy's knobs (`ServeArgs.worker_autoscaling`); names follow Ray Serve's
    `AutoscalingConfig` where the meaning is the same."""

    model_config = ConfigDict(extra="forbid", strict=True)

    target_ongoing_requests: float | None = Field(None, gt=0)  # None: max_num_seqs / 2
    target_kv_usage: float = Field(0.8, gt=0, le=1)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    look_back_period_s: float = Field(5.0, gt=0)
    upscaling_factor: float = Field(1.0, gt=0)
    downscaling_factor: float = Field(1.0, gt=0)
    metrics_interval_s: float = Field(1.0, gt=0)  # how often the pool decides
    # a drained worker's running requests move at once with their KV (live migration:
    # nothing recomputed); off, they may finish there until drain_timeout_s
    migrate_on_drain: bool = True
    # how long a drained worker may finish the requests it keeps before they move
    # elsewhere (re-prefilled)
    drain_timeout_s: float = Field(600.0, ge=0)
    # a worker not ready by then (no node has room, or its model loads too slowly) is
    # reported, stopped and started again (a GPU node can take minutes to join)
    worker_start_timeout_s: float = Field(600.0, gt=0)

    @classmethod
    def parse(cls, knobs: dict | AutoscalingConfig | None) -> AutoscalingConfig:
        """From a user's dict; ValueError naming the knob (unknown, negative, not a number)."""
        if isinstance(knobs, AutoscalingConfig):
            return knobs
        if knobs is not None and not isinstance(knobs, dict):
            raise ValueError(f"worker_autoscaling: expected an object of knobs, got {knobs!r}")
        from pydantic import ValidationError

        # JSON has one number type: 10 means 10.0 here (strict mode would refuse an int)
        coerced = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                   for k, v in (knobs or {}).items()}
        try:
            return cls.model_validate(coerced)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            name = ".".join(str(p) for p in err["loc"]) or "worker_autoscaling"
            msg = "unknown knob" if err["type"] == "extra_forbidden" else err["msg"]
            raise ValueError(f"worker_autoscaling.{name}: {msg} (got {err.get('input')!r}); "
                             f"knobs: {', '.join(cls.model_fields)}") from None


@dataclass(slots=True)
class PoolSignals:
    """What the router knows at one moment (seats are sequences: a request of n holds n)."""

    now: float  # monotonic seconds
    queued_seqs: int  # waiting in the router's queue
    queued_blocks: int  # KV blocks those will need
    running_seqs: int  # admitted to workers, not yet released
    used_blocks: int  # KV blocks the admitted requests hold (the router's ledger)
    seats_per_worker: int  # a worker's max_num_seqs (the smallest, if they differ)
    blocks_per_worker: int  # a worker's KV pool (the smallest)
    current: int  # workers ready or starting (not draining)
    oldest_wait_s: float = 0.0  # age of the queue's head


@dataclass(slots=True)
class Decision:
    time: float
    current: int
    target: int
    reason: str

    def as_dict(self) -> dict:
        return {"time": self.time, "from": self.current, "to": self.target,
                "reason": self.reason}


class ScalingPolicy:
    """`decide(signals)` -> the worker count to aim for, from the signals and its history."""

    def __init__(self, config: AutoscalingConfig, min_workers: int, max_workers: int) -> None:
        if not 0 < min_workers <= max_workers:
            raise ValueError(f"min_workers ({min_workers}) must be >= 1 and <= max_workers "
                             f"({max_workers})")
        self.config = config
        self.min_workers = min_workers
        self.max_workers = max_workers
        self._raw: deque[tuple[float, float]] = deque()  # (time, workers' worth of demand)
        self._smooth: deque[tuple[float, float]] = deque()  # look-back averages of _raw
        self._start: float | None = None

    def worth(self, s: PoolSignals) -> float:
        """Workers' worth of the demand in `s` (seats or KV blocks, whichever needs more)."""
        target = self.config.target_ongoing_requests or max(s.seats_per_worker / 2, 1.0)
        seats = (s.queued_seqs + s.running_seqs) / target
        blocks = (s.queued_blocks + s.used_blocks) / (self.config.target_kv_usage
                                                       * max(s.blocks_per_worker, 1))
        return max(seats, blocks)

    def decide(self, s: PoolSignals) -> Decision:
        cfg, now = self.config, s.now
        if self._start is None:
            self._start = now
        self._raw.append((now, self.worth(s)))
        while self._raw[0][0] <= now - cfg.look_back_period_s:
            self._raw.popleft()
        self._smooth.append((now, sum(v for _, v in self._raw) / len(self._raw)))
        horizon = max(cfg.upscale_delay_s, cfg.downscale_delay_s)
        while self._smooth[0][0] < now - horizon:
            self._smooth.popleft()

        per_worker = cfg.target_ongoing_requests or max(s.seats_per_worker / 2, 1.0)
        current, target = s.current, s.current
        # said even when nothing changes: /cluster/stats shows why the pool stays as it is
        reason = (f"steady: demand of {self._smooth[-1][1]:.2f} workers ({s.running_seqs} "
                  f"running + {s.queued_seqs} queued seqs at {per_worker:g} per worker)")
        sustained = self._window(now, cfg.upscale_delay_s, min)
        peak = self._window(now, cfg.downscale_delay_s, max)
        if sustained is not None and _ceil(sustained) > current:
            step = max(1, _ceil((_ceil(sustained) - current) * cfg.upscaling_factor))
            target = current + step
            reason = (f"demand of {sustained:.2f} workers sustained for "
                      f"{cfg.upscale_delay_s:g}s ({s.queued_seqs} queued, {s.running_seqs} "
                      f"running seqs; queue head waited {s.oldest_wait_s:.1f}s)")
        elif peak is not None and _ceil(peak) < current:
            step = max(1, _ceil((current - _ceil(peak)) * cfg.downscaling_factor))
            target = current - step
            reason = f"peak demand of {peak:.2f} workers over {cfg.downscale_delay_s:g}s"
        floor = _ceil(max(s.running_seqs / max(s.seats_per_worker, 1),
                          s.used_blocks / max(s.blocks_per_worker, 1)))
        if target < floor:
            target, reason = floor, f"{reason}; kept {floor} for the work admitted now"
        clamped = min(max(target, self.min_workers), self.max_workers)
        if clamped != target:
            reason = f"{reason}; clamped to [{self.min_workers}, {self.max_workers}]"
        return Decision(now, current, clamped, reason)

    def _window(self, now: float, seconds: float, pick) -> float | None:
        """`pick` (min or max) of the smoothed demand over the last `seconds`, or None until
        the history covers that window (no decision from a partial view)."""
        if self._start is None or now - self._start < seconds - _EPS:
            return None
        values = [v for t, v in self._smooth if t >= now - seconds - _EPS]
        return pick(values) if values else None


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)
