"""The Serve application: a cluster deployment that owns the router and workers, and the
OpenAI ingress deployment in front of it.

`build_app(args)` is the import path Serve configs name (`raysvc.serve.app:build_app`);
`raysvc serve` calls it too. The cluster deployment (one replica) starts the router and
the draft-model actor pool (`draft_workers`); the router starts the workers and scales
them between `min_workers` and `max_workers` (`raysvc/cluster/pool.py`). Ingress replicas
ask it once for the router's handle and the model's facts, then talk to the router and
the workers directly: Serve's request path carries HTTP only.

No process is a single point of failure. The router, workers and draft actors are named
after the application and its arguments (`raysvc.<app>.<args digest>:router`,
`:worker-N`, `:draft-N`) and detached, so none dies with the process that created it: Ray
restarts a dead router, which rebuilds itself from its workers; Serve restarts a dead
cluster replica, which re-adopts the live router and draft actors by name instead of
starting a second set, and claims them (a replica stopping later stops only what it
still owns). New arguments (a config update) make new names: the new replica starts its
own set while the old one drains and stops. They live and die with the application:
deleting it runs the replica's `__del__`, which drains and stops them, and a router that
hears nothing from its replica for `orphan_timeout_s` (the replica gone for good) stops
its workers and itself.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from ray import serve

from raysvc.serve.args import ServeArgs

logger = logging.getLogger(__name__)


ORPHAN_TIMEOUT_S = 120.0  # a router alone this long (its replica gone for good) stops
HEALTH_CHECK_PERIOD_S = 2.0  # the cluster replica's keepalive to the router, via Serve
# A stopped replica's router waits this long for a new replica (a config update) to claim
# it before it stops its workers (the application was deleted).
ABANDON_GRACE_S = 60.0


def _keepalive_while_starting(router: Any,
                              period_s: float = HEALTH_CHECK_PERIOD_S) -> threading.Event:
    """Keepalives from a thread until the returned event is set. Should this replica die
    mid-start, the beats stop with it and the orphan guard still fires."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(period_s):
            try:
                router.keepalive.remote()
            except Exception:  # restarting: the next beat, or Serve's checks, will do
                pass

    threading.Thread(target=beat, daemon=True, name="raysvc-keepalive").start()
    return done


class RaysvcCluster:
    """Starts (or re-adopts) the router and the draft actors; hands ingress replicas the
    router's handle and the model's facts."""

    def __init__(self, args: dict[str, Any]) -> None:

        from raysvc.cluster.launch import AppNames, start_router

        a = ServeArgs(**args)
        self.names = AppNames(f"raysvc.{_app_name()}.{_digest(a)}")
        self.token = uuid.uuid4().hex
        self.drain_s = a.ingress_graceful_shutdown_timeout_s
        self.draft_actors = a.start_draft_pool(self.names)
        self.router = start_router(max_queue_len=a.max_queue_len,
                                   max_seqs_per_worker=a.max_seqs_per_worker,
                                   placement=a.placement, resources=a.control_resources,
                                   worker_spec=a.worker_spec(
                                       [self.names.draft(i) for i in range(a.draft_workers)],
                                       self.names),
                                   min_workers=a.min_workers, max_workers=a.max_workers,
                                   autoscaling=a.worker_autoscaling, names=self.names,
                                   orphan_timeout_s=ORPHAN_TIMEOUT_S)
        # Serve health-checks (our keepalive) only once this constructor returns, and it
        # waits for the first workers, whose model may load for minutes: beat meanwhile,
        # or the router's orphan guard would stop the workers it is waiting for.
        starting = _keepalive_while_starting(self.router)
        try:
            _call_router(lambda: self.router.claim.remote(self.token), 120)
            start_timeout = a.autoscaling().worker_start_timeout_s
            ready = _call_router(lambda: self.router.start_workers.remote(a.num_workers,
                                                                         start_timeout),
                                 start_timeout + 60)
            logger.warning("raysvc cluster %s: %d worker(s) ready", self.names.prefix, ready)
            infos = _call_router(lambda: self.router.workers.remote(), 60)
        finally:
            starting.set()
        if not infos:
            raise RuntimeError(f"raysvc cluster {self.names.prefix}: no worker is ready")
        self.facts = {
            "model_path": next(iter(infos.values())).model,
            "max_model_len": min(i.max_model_len for i in infos.values()),
            "vocab_size": min(i.vocab_size for i in infos.values()),
            "block_size": next(iter(infos.values())).block_size,  # the ingress hashes with it
        }

    async def describe(self) -> dict[str, Any]:
        return {"router": self.router, "router_name": self.names.router, **self.facts}

    async def check_health(self) -> None:
        """Serve's periodic health check doubles as the router's keepalive. It never fails
        on the router's account: a restarting router comes back by itself, and failing here
        would make Serve replace this replica for nothing."""
        from ray.exceptions import ActorDiedError

        try:
            await self.router.keepalive.remote()
        except ActorDiedError:  # gone for good (not restarting): a new replica starts anew
            raise
        except Exception as e:
            logger.warning("raysvc cluster: router keepalive failed: %r", e)

    def __del__(self) -> None:
        """Serve stops this replica: the application is being deleted, or a config update
        replaces the replica (Serve may stop it before starting the new one). The router
        cannot tell yet, so it is told to stop its workers, draft actors and itself unless
        a new replica claims it within ABANDON_GRACE_S; meanwhile it serves on, so an
        update never cuts or refuses a request, and the new replica adopts every worker."""
        import ray

        router = getattr(self, "router", None)
        if router is None or not ray.is_initialized():  # Ray itself is gone: nothing to tell
            return
        drafts = [self.names.draft(i) for i in range(len(getattr(self, "draft_actors", [])))]
        try:
            ray.get(router.abandon.remote(self.token, self.drain_s, ABANDON_GRACE_S, drafts),
                    timeout=30)
        except Exception as e:  # already gone: its workers die with the application anyway
            logger.warning("raysvc cluster: router abandon failed: %r", e)


def _digest(a: ServeArgs) -> str:
    """Eight hex digits of the arguments that shape the router, workers and draft actors."""
    import hashlib
    import json

    shaping = a.model_dump(exclude={"api_key", "max_body_bytes", "max_n", "ingress_replicas",
                                    "ingress_num_cpus", "max_ongoing_requests",
                                    "max_queued_requests", "ingress_autoscaling",
                                    "ingress_graceful_shutdown_timeout_s", "tool_call_parser",
                                    "trust_request_chat_template", "allowed_origins",
                                    "allow_unauthenticated", "metrics_public",
                                    "enable_fastapi_docs", "max_stop_strings",
                                    "max_stop_string_length", "max_bad_words",
                                    "max_logit_bias", "max_structured_output_bytes",
                                    "max_logprobs",
                                    "served_model_name"})
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()
                          ).hexdigest()[:8]


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # constructed outside Serve (tests): one application per Ray namespace
        return "default"


def _call_router(call, timeout_s: float):
    """`ray.get(call())`, waiting out a router that is restarting (it refuses calls then)."""
    import time

    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call(), timeout=max(deadline - time.monotonic(), 1.0))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@serve.ingress()
class OpenAIIngress:
    """One ingress replica: tokenizer, request checks and response shaping."""

    async def __init__(self, cluster: Any, args: dict[str, Any]) -> None:
        from raysvc.engine.loading import load_tokenizer
        from raysvc.serve.handler import OpenAIHandler
        from raysvc.serve.planner import ModelFacts

        a = ServeArgs(**args)
        facts = await cluster.describe.remote()
        tokenizer = load_tokenizer(Path(facts["model_path"]))
        if tokenizer is None:
            raise ValueError(f"model {facts['model_path']}: no tokenizer; the HTTP server "
                             f"needs one")
        tokenizer.model_max_length = 1 << 62  # lengths are checked against the context here
        model = ModelFacts(name=a.model_name(), max_model_len=facts["max_model_len"],
                           vocab_size=facts["vocab_size"], max_n=a.max_n,
                           trust_request_chat_template=a.trust_request_chat_template,
                           limits=a.request_limits(),
                           tool_parser=_tool_parser(a, tokenizer, facts["model_path"]),
                           loras=dict(a.engine.get("lora_modules") or {}))
        self.allowed_origins = a.allowed_origins
        self.metrics_public, self.enable_docs = a.metrics_public, a.enable_fastapi_docs
        from raysvc.cluster.actors import actor
        from raysvc.cluster.client import ClusterClient

        router_name = facts["router_name"]
        client = ClusterClient(facts["router"], resolve=lambda: actor(router_name),
                               block_size=facts.get("block_size"))
        self.server = OpenAIHandler(tokenizer, model, client, api_key=a.resolved_api_key(),
                                    max_body_bytes=a.max_body_bytes)
        if a.allow_runtime_lora_updating:
            from raysvc.serve.lora_admin import LoRAAdmin

            self.server.lora_admin = LoRAAdmin(model, client)

    def __serve_build_asgi_app__(self):
        from raysvc.serve.http_api import build_api

        return build_api(self.server, self.allowed_origins, metrics_public=self.metrics_public,
                         enable_docs=self.enable_docs)


def _tool_parser(a: ServeArgs, tokenizer, model_path: str) -> str:
    if a.tool_call_parser != "auto":
        return a.tool_call_parser
    import json

    from raysvc.serve.tool_parsers import parser_for

    try:
        model_type = json.loads((Path(model_path) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        model_type = ""
    return parser_for(getattr(tokenizer, "chat_template", None), model_type)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve deploy` configs and for `raysvc serve`."""
    a = ServeArgs(**args)
    from raysvc.engine.config import EngineConfig

    EngineConfig.from_kwargs(**{**a.engine, "model": a.model})  # fail here, not in a replica
    plain = a.model_dump()
    control = {"resources": dict(a.control_resources)} if a.control_resources else {}
    cluster = serve.deployment(
        RaysvcCluster, name="RaysvcCluster", num_replicas=1,
        ray_actor_options={"num_cpus": 0, **control}, max_ongoing_requests=1024,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        # its __del__ drains the router's requests before it stops the workers
        graceful_shutdown_timeout_s=a.ingress_graceful_shutdown_timeout_s + 30,
    ).bind(plain)
    replicas: dict[str, Any] = ({"autoscaling_config": a.ingress_autoscaling}
                                if a.ingress_autoscaling else {"num_replicas": a.ingress_replicas})
    ingress = serve.deployment(
        OpenAIIngress, name="OpenAIIngress", **replicas,
        ray_actor_options={"num_cpus": a.ingress_num_cpus, **control},
        max_ongoing_requests=a.max_ongoing_requests,
        # beyond every replica's max_ongoing_requests, Serve's proxy queues this many,
        # then answers 429 with Retry-After at once (not an unbounded queue)
        max_queued_requests=a.max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
        graceful_shutdown_timeout_s=a.ingress_graceful_shutdown_timeout_s,
    )
    return ingress.bind(cluster, plain)
