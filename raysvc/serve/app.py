"""The Serve application: a cluster deployment that owns the router and workers, and the
OpenAI ingress deployment in front of it.

`build_app(args)` is the import path Serve configs name (`raysvc.serve.app:build_app`);
`raysvc serve` calls it too. The cluster deployment (one replica) starts the router and
the draft-model actor pool (`draft_workers`); the router starts the workers and scales
them between `min_workers` and `max_workers` (`raysvc/cluster/pool.py`). All of them live
and die with the Serve application, so `serve shutdown` or deleting the app leaves
nothing behind. Ingress replicas ask it once for the router's handle and the model's
facts, then talk to the router and the workers directly: Serve's request path carries
HTTP only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

logger = logging.getLogger(__name__)


class ServeArgs(BaseModel):
    """Everything `raysvc serve` and a Serve config's `args:` may set."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # checkpoint dir; None: the built-in "tiny"
    served_model_name: str | None = None  # what clients send as "model" (default: model)
    # The worker pool: `num_workers` start, then the router scales between min and max
    # (min == max, the default, is a fixed pool). None: from the others (see _worker_range).
    num_workers: int | None = Field(None, ge=1)
    min_workers: int | None = Field(None, ge=1)
    max_workers: int | None = Field(None, ge=1)
    # the policy's knobs (raysvc/cluster/autoscaler.py AutoscalingConfig), e.g.
    # {"target_ongoing_requests": 32, "upscale_delay_s": 10, "downscale_delay_s": 300}
    worker_autoscaling: dict[str, Any] = Field(default_factory=dict)
    engine: dict[str, Any] = Field(default_factory=dict)  # EngineConfig fields
    worker_num_cpus: float = Field(1.0, ge=0)
    worker_num_gpus: float | None = None  # None: 1 on a GPU cluster, else 0
    worker_resources: dict[str, float] = Field(default_factory=dict)
    worker_torch_threads: int | None = None
    stream_interval_s: float = Field(0.0, ge=0)
    max_queue_len: int = Field(1024, ge=1)
    max_seqs_per_worker: int | None = Field(None, ge=1)
    # PlacementConfig fields (raysvc/cluster/placement.py): policy, weights, thresholds
    placement: dict[str, Any] = Field(default_factory=dict)
    worker_max_restarts: int = Field(3, ge=-1)  # a restarted worker re-joins the router
    api_key: str | None = None  # None: $RAYSVC_API_KEY if set, else no auth
    max_body_bytes: int = Field(4 << 20, ge=1024)
    max_n: int = Field(16, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    # Serve's own autoscaling_config for the ingress deployment (min_replicas,
    # max_replicas, target_ongoing_requests, ...); replaces ingress_replicas when set
    ingress_autoscaling: dict[str, Any] | None = None
    # How long Serve lets a stopping ingress replica finish its streams (Serve's default of
    # 20 s would cut any LLM stream longer than that on a downscale or an upgrade).
    ingress_graceful_shutdown_timeout_s: float = Field(600.0, ge=0)
    # Draft-model actor pool: proposals for every worker's speculation come from this many
    # draft actors (0: each worker drafts in process, if engine.speculative_config asks).
    draft_workers: int = Field(0, ge=0)
    draft_num_cpus: float = Field(1.0, ge=0)
    draft_num_gpus: float = Field(0.0, ge=0)  # e.g. 0.25: four draft actors share a GPU
    draft_torch_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _worker_range(self) -> ServeArgs:
        """min/max/num_workers: none set -> one fixed worker; only num_workers -> a fixed
        pool of that size; max without min -> min 1; num_workers defaults to min."""
        lo, hi, n = self.min_workers, self.max_workers, self.num_workers
        if lo is None:
            lo = 1 if hi is not None else (n or 1)
        if hi is None:
            hi = max(lo, n or lo)
        if lo > hi:
            raise ValueError(f"min_workers ({lo}) must not exceed max_workers ({hi})")
        n = lo if n is None else n
        if not lo <= n <= hi:
            raise ValueError(f"num_workers ({n}) must lie within [min_workers, max_workers] "
                             f"= [{lo}, {hi}]")
        from raysvc.cluster.autoscaler import AutoscalingConfig

        AutoscalingConfig.parse(self.worker_autoscaling)
        self.min_workers, self.max_workers, self.num_workers = lo, hi, n
        return self

    @field_validator("ingress_autoscaling")
    @classmethod
    def _ingress_autoscaling_is_serves(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        from ray.serve.config import AutoscalingConfig

        unknown = sorted(set(v) - set(AutoscalingConfig.model_fields))
        if unknown:  # Serve itself ignores a misspelt knob
            raise ValueError(f"ingress_autoscaling: unknown field(s) {', '.join(unknown)}; "
                             f"Serve's AutoscalingConfig has "
                             f"{', '.join(AutoscalingConfig.model_fields)}")
        try:
            AutoscalingConfig(**v)
        except Exception as e:
            raise ValueError(f"ingress_autoscaling: {e}") from None
        return v

    @model_validator(mode="after")
    def _draft_pool_needs_a_draft_model(self) -> ServeArgs:
        if self.draft_workers:
            spec = self.engine.get("speculative_config") or {"method": "draft_model"}
            if not isinstance(spec, dict) or spec.get("method") != "draft_model":
                raise ValueError('draft_workers: the draft actor pool serves speculative_config '
                                 '{"method": "draft_model"}; got ' + repr(spec))
            self.engine = {**self.engine, "speculative_config": spec}
        return self

    def model_name(self) -> str:
        return self.served_model_name or self.model or "tiny"

    def autoscaling(self):
        from raysvc.cluster.autoscaler import AutoscalingConfig

        return AutoscalingConfig.parse(self.worker_autoscaling)

    @field_validator("placement")
    @classmethod
    def _placement_is_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        from raysvc.cluster.placement import PlacementConfig

        try:
            PlacementConfig(**v)
        except TypeError as e:
            raise ValueError(f"placement: {e}") from None
        return v

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("RAYSVC_API_KEY") or None

    def worker_spec(self, draft_actors: list | None = None):
        from raysvc.cluster.launch import WorkerSpec

        kwargs = {**self.engine, "model": self.model}
        return WorkerSpec(engine_kwargs=kwargs, num_cpus=self.worker_num_cpus,
                          num_gpus=self.worker_num_gpus, resources=self.worker_resources,
                          torch_threads=self.worker_torch_threads,
                          stream_interval_s=self.stream_interval_s,
                          max_restarts=self.worker_max_restarts,
                          draft_actors=list(draft_actors or []))

    def start_draft_pool(self) -> list:
        """The draft actors (none unless `draft_workers`), sized like the workers' engines."""
        if not self.draft_workers:
            return []
        from raysvc.cluster.draft_pool import start_draft_pool

        e = self.engine
        return start_draft_pool(
            self.draft_workers, model=e["speculative_config"].get("model"),
            num_cpus=self.draft_num_cpus, num_gpus=self.draft_num_gpus,
            num_threads=self.draft_torch_threads or max(int(self.draft_num_cpus), 1),
            dtype=e.get("dtype", "auto"), block_size=e.get("block_size", 16),
            max_model_len=e.get("max_model_len") or 4096)


class RaysvcCluster:
    """Owns the router (which owns the workers); hands ingress replicas its handle."""

    def __init__(self, args: dict[str, Any]) -> None:
        import ray

        from raysvc.cluster.launch import start_router

        a = ServeArgs(**args)
        self.draft_actors = a.start_draft_pool()
        self.router = start_router(max_queue_len=a.max_queue_len,
                                   max_seqs_per_worker=a.max_seqs_per_worker,
                                   placement=a.placement,
                                   worker_spec=a.worker_spec(self.draft_actors),
                                   min_workers=a.min_workers, max_workers=a.max_workers,
                                   autoscaling=a.worker_autoscaling)
        start_timeout = a.autoscaling().worker_start_timeout_s
        ray.get(self.router.start_workers.remote(a.num_workers, start_timeout),
                timeout=start_timeout + 60)
        infos = ray.get(self.router.workers.remote(), timeout=60)
        self.facts = {
            "model_path": next(iter(infos.values())).model,
            "max_model_len": min(i.max_model_len for i in infos.values()),
            "vocab_size": min(i.vocab_size for i in infos.values()),
        }

    async def describe(self) -> dict[str, Any]:
        return {"router": self.router, **self.facts}

    async def check_health(self) -> None:
        await self.router.workers.remote()  # raises if the router actor is gone


@serve.ingress()
class OpenAIIngress:
    """One ingress replica: tokenizer, request checks and response shaping."""

    async def __init__(self, cluster: Any, args: dict[str, Any]) -> None:
        from raysvc.engine.llm_engine import load_tokenizer
        from raysvc.serve.openai_server import OpenAIServer
        from raysvc.serve.requests import ModelFacts

        a = ServeArgs(**args)
        facts = await cluster.describe.remote()
        tokenizer = load_tokenizer(Path(facts["model_path"]))
        if tokenizer is None:
            raise ValueError(f"model {facts['model_path']}: no tokenizer; the HTTP server "
                             f"needs one")
        tokenizer.model_max_length = 1 << 62  # lengths are checked against the context here
        model = ModelFacts(name=a.model_name(), max_model_len=facts["max_model_len"],
                           vocab_size=facts["vocab_size"], max_n=a.max_n)
        self.server = OpenAIServer(tokenizer, model, facts["router"],
                                   api_key=a.resolved_api_key(), max_body_bytes=a.max_body_bytes)

    def __serve_build_asgi_app__(self):
        from raysvc.serve.api import build_api

        return build_api(self.server)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve deploy` configs and for `raysvc serve`."""
    a = ServeArgs(**args)
    from raysvc.engine.config import EngineConfig

    EngineConfig.from_kwargs(**{**a.engine, "model": a.model})  # fail here, not in a replica
    plain = a.model_dump()
    cluster = serve.deployment(
        RaysvcCluster, name="RaysvcCluster", num_replicas=1,
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
    ).bind(plain)
    replicas: dict[str, Any] = ({"autoscaling_config": a.ingress_autoscaling}
                                if a.ingress_autoscaling else {"num_replicas": a.ingress_replicas})
    ingress = serve.deployment(
        OpenAIIngress, name="OpenAIIngress", **replicas,
        ray_actor_options={"num_cpus": a.ingress_num_cpus},
        max_ongoing_requests=a.max_ongoing_requests,
        graceful_shutdown_timeout_s=a.ingress_graceful_shutdown_timeout_s,
    )
    return ingress.bind(cluster, plain)
