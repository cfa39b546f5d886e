"""Prometheus metrics through `ray.util.metrics`, named after vLLM's (`vllm:x` -> `raysvc_x`).

Ray's metrics agent on each node exports them (prefixed `ray_`) on its Prometheus port.
The router records the cluster's gauges, and the speculative-decoding counters, from the
load reports it already polls; the ingress records per-request latencies and token counts,
as its clients see them. Every
call is tolerant: outside a Ray worker (unit tests) the metrics quietly do nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from raysvc.cluster.messages import WorkerLoad

logger = logging.getLogger(__name__)

# Seconds; like vLLM's buckets, dense where interactive latencies live.
LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]


def _make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **kw) -> Any:
    try:
        from ray.util import metrics

        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kw)
    except Exception as e:  # no Ray, or a metrics backend that refuses: run without metrics
        logger.debug("metric %s disabled: %r", name, e)
        return None


def _record(metric: Any, method: str, value: float, tags: dict[str, str]) -> None:
    if metric is None:
        return
    try:
        getattr(metric, method)(value, tags=tags)
    except Exception as e:
        logger.debug("metric record failed: %r", e)


class ClusterMetrics:
    """Gauges of the router's view: requests running / waiting and KV usage per worker."""

    def __init__(self) -> None:
        tags = ("worker_id",)
        self.running = _make("Gauge", "raysvc_num_requests_running",
                             "Requests in a worker's running batch.", tags)
        self.waiting = _make("Gauge", "raysvc_num_requests_waiting",
                             "Requests waiting: in the router's queue (worker_id=router) or "
                             "in a worker's engine queue.", tags)
        self.kv_usage = _make("Gauge", "raysvc_kv_cache_usage_perc",
                              "Fraction of a worker's KV blocks in use (1 = full).", tags)
        self.preemptions = _make("Gauge", "raysvc_num_preemptions",
                                 "Preemptions so far on a worker.", tags)
        # vLLM's spec_decode counters: acceptance rate = accepted / draft tokens, mean
        # accepted length = 1 + accepted / drafts, per position = per_pos[i] / drafts
        self.spec_drafts = _make("Counter", "raysvc_spec_decode_num_drafts",
                                 "Speculative verifications (one per sequence per step).", tags)
        self.spec_draft_tokens = _make("Counter", "raysvc_spec_decode_num_draft_tokens",
                                       "Proposed tokens.", tags)
        self.spec_accepted = _make("Counter", "raysvc_spec_decode_num_accepted_tokens",
                                   "Accepted proposed tokens.", tags)
        self.spec_accepted_per_pos = _make(
            "Counter", "raysvc_spec_decode_num_accepted_tokens_per_pos",
            "Accepted proposed tokens by position in the proposal.", ("worker_id", "position"))
        # vLLM's prefix_cache_queries / _hits: hit rate = hits / queries (tokens)
        self.prefix_queries = _make("Counter", "raysvc_prefix_cache_queries",
                                    "Prompt tokens looked up in a worker's prefix cache.", tags)
        self.prefix_hits = _make("Counter", "raysvc_prefix_cache_hits",
                                 "Prompt tokens found in a worker's prefix cache.", tags)
        # the kv fabric: KV moved between workers instead of recomputed
        self.kv_pull_blocks = _make("Counter", "raysvc_kv_pull_blocks",
                                    "Prefix blocks a worker pulled from another.", tags)
        self.kv_pull_bytes = _make("Counter", "raysvc_kv_pull_bytes",
                                   "KV bytes a worker pulled from another.", tags)
        self.kv_pull_failures = _make("Counter", "raysvc_kv_pull_failures",
                                      "Prefix pulls that failed (recomputed).", tags)
        self.kv_migrations = _make("Counter", "raysvc_kv_migrations",
                                   "Sequences a worker took in with their KV (live "
                                   "migration off a draining worker).", tags)
        self.kv_migration_failures = _make("Counter", "raysvc_kv_migration_failures",
                                           "Migrated KV a worker failed to take "
                                           "(recomputed).", tags)
        self.kv_tokens_carried = _make("Counter", "raysvc_kv_tokens_carried",
                                       "Tokens admitted with KV computed on another "
                                       "worker.", tags)

        tags = ()
        self.workers_target = _make("Gauge", "raysvc_workers_target",
                                    "Workers the pool aims for (the autoscaler's target).", tags)
        self.workers_ready = _make("Gauge", "raysvc_workers_ready",
                                   "Workers taking traffic.", tags)
        self.workers_starting = _make("Gauge", "raysvc_workers_starting",
                                      "Workers started but not ready (pending a node, or "
                                      "loading their model).", tags)
        self.workers_draining = _make("Gauge", "raysvc_workers_draining",
                                      "Workers finishing their requests before they stop.", tags)

    def pool(self, target: int, ready: int, starting: int, draining: int) -> None:
        for metric, value in ((self.workers_target, target), (self.workers_ready, ready),
                              (self.workers_starting, starting),
                              (self.workers_draining, draining)):
            _record(metric, "set", value, {})

    def queue(self, length: int) -> None:
        _record(self.waiting, "set", length, {"worker_id": "router"})

    def worker(self, worker_id: str, load: WorkerLoad, previous: WorkerLoad | None = None) -> None:
        """Record a load report; counters grow by what it adds to `previous` (the same
        worker's last report; a restarted worker starts a new entry, from zero)."""
        tags = {"worker_id": worker_id}
        _record(self.running, "set", load.running, tags)
        _record(self.waiting, "set", load.waiting, tags)
        used = 1.0 - load.kv_blocks_free / load.kv_blocks_total if load.kv_blocks_total else 0.0
        _record(self.kv_usage, "set", used, tags)
        _record(self.preemptions, "set", load.num_preemptions, tags)
        prev = previous or WorkerLoad()
        for metric, new, old in (
                (self.prefix_queries, load.prefix_cache_queries, prev.prefix_cache_queries),
                (self.prefix_hits, load.prefix_cache_hits, prev.prefix_cache_hits),
                (self.spec_drafts, load.spec_num_drafts, prev.spec_num_drafts),
                (self.spec_draft_tokens, load.spec_draft_tokens, prev.spec_draft_tokens),
                (self.spec_accepted, load.spec_accepted_tokens, prev.spec_accepted_tokens),
                (self.kv_pull_blocks, load.kv_pull_blocks, prev.kv_pull_blocks),
                (self.kv_pull_bytes, load.kv_pull_bytes, prev.kv_pull_bytes),
                (self.kv_pull_failures, load.kv_pull_failures, prev.kv_pull_failures),
                (self.kv_migrations, load.kv_migrations_in, prev.kv_migrations_in),
                (self.kv_migration_failures, load.kv_migration_failures,
                 prev.kv_migration_failures),
                (self.kv_tokens_carried, load.kv_tokens_carried, prev.kv_tokens_carried)):
            _inc(metric, new, old, tags)
        old_pos = prev.spec_accepted_tokens_per_position
        for pos, new in enumerate(load.spec_accepted_tokens_per_position):
            _inc(self.spec_accepted_per_pos, new, old_pos[pos] if pos < len(old_pos) else 0,
                 {**tags, "position": str(pos)})

    def forget_worker(self, worker_id: str) -> None:
        self.worker(worker_id, WorkerLoad())


def _inc(counter: Any, new: int, old: int, tags: dict[str, str]) -> None:
    """Add a cumulative count's growth since `old` (all of `new` if it went back: a reset)."""
    grown = new - old if new >= old else new
    if grown > 0:
        _record(counter, "inc", grown, tags)


class RequestMetrics:
    """Per-request figures, recorded by the ingress as its clients experience them."""

    def __init__(self, model_name: str) -> None:
        tags = ("model_name",)
        self.tags = {"model_name": model_name}
        hist = dict(boundaries=LATENCY_BUCKETS)
        self.ttft = _make("Histogram", "raysvc_time_to_first_token_seconds",
                          "Time to first token.", tags, **hist)
        self.itl = _make("Histogram", "raysvc_inter_token_latency_seconds",
                         "Time between output chunks, per token.", tags, **hist)
        self.e2e = _make("Histogram", "raysvc_e2e_request_latency_seconds",
                         "End-to-end request latency.", tags, **hist)
        self.prompt_tokens = _make("Counter", "raysvc_prompt_tokens",
                                   "Prompt tokens processed.", tags)
        self.generation_tokens = _make("Counter", "raysvc_generation_tokens",
                                       "Generated tokens.", tags)
        self.finished = _make("Counter", "raysvc_request_success",
                              "Finished requests by finish reason.", ("model_name",
                                                                       "finished_reason"))

    def first_token(self, seconds: float) -> None:
        _record(self.ttft, "observe", seconds, self.tags)

    def inter_token(self, seconds: float, num_tokens: int) -> None:
        for _ in range(max(num_tokens, 1)):
            _record(self.itl, "observe", seconds / max(num_tokens, 1), self.tags)

    def request_done(self, seconds: float, prompt_tokens: int, generation_tokens: int,
                     reasons: list[str]) -> None:
        _record(self.e2e, "observe", seconds, self.tags)
        if prompt_tokens:
            _record(self.prompt_tokens, "inc", prompt_tokens, self.tags)
        if generation_tokens:
            _record(self.generation_tokens, "inc", generation_tokens, self.tags)
        for reason in reasons:
            _record(self.finished, "inc", 1, {**self.tags, "finished_reason": reason})
