"""`ServeArgs`: everything `raysvc serve`, a Serve config's `args:` and a RayService's
`serveConfigV2` may set, checked before anything starts (each error names its field)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    worker_num_gpus: float | None = Field(None, ge=0)  # None: 1 on a GPU cluster, else 0
    worker_resources: dict[str, float] = Field(default_factory=dict)
    worker_torch_threads: int | None = None
    stream_interval_s: float = Field(0.0, ge=0)
    # A worker whose engine has spent this long in one step is stuck: its health check
    # fails, the router drops it, and streams waiting on it fail over. One step is
    # bounded by max_num_batched_tokens, so this is minutes only for a hung device.
    worker_stuck_timeout_s: float = Field(300.0, gt=0)
    max_queue_len: int = Field(1024, ge=1)
    max_seqs_per_worker: int | None = Field(None, ge=1)
    # PlacementConfig fields (raysvc/cluster/placement.py): policy, weights, thresholds
    placement: dict[str, Any] = Field(default_factory=dict)
    worker_max_restarts: int = Field(3, ge=-1)  # a restarted worker re-joins the router
    api_key: str | None = None  # None: $RAYSVC_API_KEY if set, else no auth
    # Without a key, `raysvc serve` refuses a non-loopback --host unless this is set.
    allow_unauthenticated: bool = False
    metrics_public: bool = False  # /metrics without the key (scrapers rarely carry one)
    enable_fastapi_docs: bool = False  # /docs and /openapi.json (off: they map the API)
    max_body_bytes: int = Field(4 << 20, ge=1024)
    max_n: int = Field(16, ge=1)
    # what one request may cost beyond its tokens (raysvc/serve/planner.py RequestLimits)
    max_stop_strings: int = Field(16, ge=1)
    max_stop_string_length: int = Field(256, ge=1)
    max_bad_words: int = Field(64, ge=0)
    max_logit_bias: int = Field(300, ge=0)
    max_structured_output_bytes: int = Field(65536, ge=64)
    max_logprobs: int = Field(20, ge=0, le=20)  # vLLM's; 20 is also OpenAI's maximum
    # how the model writes tool calls: "auto" (from its chat template and architecture),
    # or vLLM's --tool-call-parser names: hermes, llama3_json, mistral
    tool_call_parser: str = "auto"
    trust_request_chat_template: bool = False  # vLLM's: requests may bring chat_template
    # /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's, behind its
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING): callers may make workers read a directory
    allow_runtime_lora_updating: bool = False
    allowed_origins: list[str] = Field(default_factory=lambda: ["*"])  # CORS, as vLLM's
    # two by default: one replica's death then cuts only its own connections
    ingress_replicas: int = Field(2, ge=1)
    ingress_num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)  # per ingress replica (streams included)
    # Serve's proxy queue in front of the ingress replicas; beyond it 429 + Retry-After.
    # Serve counts a request as queued while it picks a replica, so a burst of new
    # connections fills this even when replicas have room: keep it well above bursts.
    max_queued_requests: int = Field(1024, ge=0)
    # resources that pin the control plane (router, cluster replica, ingress) to CPU
    # nodes, e.g. {"raysvc_control": 1} advertised by the head: a control actor on a GPU
    # node would keep that node from ever being idle and released
    control_resources: dict[str, float] = Field(default_factory=dict)
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

    @field_validator("engine")
    @classmethod
    def _engine_is_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        """EngineConfig's own checks (values only: nothing is loaded), so a Serve config or
        a RayService refuses a bad engine argument where it is written."""
        from raysvc.engine.config import EngineConfig

        EngineConfig.from_kwargs(**{k: x for k, x in v.items() if k != "model"})
        return v

    @model_validator(mode="after")
    def _runtime_loras_need_lora(self) -> ServeArgs:
        if self.allow_runtime_lora_updating and not self.engine.get("enable_lora"):
            raise ValueError("allow_runtime_lora_updating: needs engine.enable_lora (serve "
                             "with --enable-lora)")
        return self

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, v: str) -> str:
        from raysvc.serve.tool_parsers import PARSERS

        if v != "auto" and v not in PARSERS:
            raise ValueError(f"tool_call_parser: {v!r} is not one of auto, {', '.join(PARSERS)}")
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _path_like(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

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

    def request_limits(self):
        from raysvc.serve.planner import RequestLimits

        return RequestLimits(max_stop_strings=self.max_stop_strings,
                             max_stop_string_length=self.max_stop_string_length,
                             max_bad_words=self.max_bad_words, max_logit_bias=self.max_logit_bias,
                             max_structured_output_bytes=self.max_structured_output_bytes,
                             max_logprobs=self.max_logprobs)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("RAYSVC_API_KEY") or None

    def worker_spec(self, draft_actors: list | None = None, names=None):
        from raysvc.cluster.launch import WorkerSpec

        kwargs = {**self.engine, "model": self.model}
        return WorkerSpec(engine_kwargs=kwargs, num_cpus=self.worker_num_cpus,
                          num_gpus=self.worker_num_gpus, resources=self.worker_resources,
                          torch_threads=self.worker_torch_threads,
                          stream_interval_s=self.stream_interval_s,
                          stuck_timeout_s=self.worker_stuck_timeout_s,
                          max_restarts=self.worker_max_restarts,
                          draft_actors=list(draft_actors or []), names=names)

    def start_draft_pool(self, names=None) -> list:
        """The draft actors (none unless `draft_workers`), sized like the workers' engines;
        with `names`, the application's named ones (re-adopted if they live)."""
        if not self.draft_workers:
            return []
        from raysvc.cluster.draft_pool import start_draft_pool

        e = self.engine
        return start_draft_pool(
            self.draft_workers, model=e["speculative_config"].get("model"),
            names=[names.draft(i) for i in range(self.draft_workers)] if names else None,
            num_cpus=self.draft_num_cpus, num_gpus=self.draft_num_gpus,
            num_threads=self.draft_torch_threads or max(int(self.draft_num_cpus), 1),
            dtype=e.get("dtype", "auto"), block_size=e.get("block_size", 16),
            max_model_len=e.get("max_model_len") or 4096)
