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
from pathlib import Path
from typing import Any

from ray import serve

from raysvc.serve.args import ServeArgs

logger = logging.getLogger(__name__)


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
                           vocab_size=facts["vocab_size"], max_n=a.max_n)
        self.server = OpenAIHandler(tokenizer, model, facts["router"],
                                   api_key=a.resolved_api_key(), max_body_bytes=a.max_body_bytes)

    def __serve_build_asgi_app__(self):
        from raysvc.serve.http_api import build_api

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
