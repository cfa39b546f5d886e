"""Start a router and its workers on the Ray cluster this process is connected to.

Resources say where a worker may run: `num_gpus=1` when the worker's engine uses a GPU,
otherwise `num_cpus` (and any custom resources, e.g. {"raysvc_worker": 1} to pin workers
to the nodes that advertise it).

Ownership: by default the caller owns the actors and they die with it. An application
(the Serve app) instead names them under one prefix (`AppNames`) and makes them detached,
so that no single process owns the others: a restarted router finds its workers by name,
a restarted cluster replica finds its router and draft actors, and whoever tears the
application down kills them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raysvc.cluster.actors import NAMESPACE
from raysvc.cluster.router import Router
from raysvc.cluster.worker import LLMWorker

# One worker serves up to max_num_seqs requests at once, each a concurrent actor call.
_WORKER_CONCURRENCY_SLACK = 64


@dataclass(frozen=True, slots=True)
class AppNames:
    """The names an application's actors go by (in the Ray namespace `raysvc`)."""

    prefix: str  # e.g. "raysvc.myapp"
    namespace: str = NAMESPACE

    def get(self, name: str) -> Any:
        """The live actor of that name (ValueError if there is none)."""
        import ray

        return ray.get_actor(name, namespace=self.namespace)

    @property
    def router(self) -> str:
        return f"{self.prefix}:router"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:{worker_id}"

    def draft(self, index: int) -> str:
        return f"{self.prefix}:draft-{index}"

    def workers_alive(self) -> dict[str, Any]:
        """worker id -> handle of every named worker of this application that is alive."""
        import ray

        head = f"{self.prefix}:worker-"
        found = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] == self.namespace and name.startswith(head):
                try:
                    found[name.split(":", 1)[1]] = self.get(name)
                except ValueError:  # died between the listing and the lookup
                    pass
        return found


@dataclass(slots=True)
class WorkerSpec:
    """How to start each worker actor."""

    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 1 if the engine will use a GPU, else 0
    resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int | None = None  # None: int(num_cpus) on CPU (>= 1)
    stream_interval_s: float = 0.0
    stuck_timeout_s: float = 300.0  # one engine step longer than this: the worker is stuck
    max_restarts: int = 0  # > 0: Ray restarts a dead worker, which re-joins its router
    # draft-model actor pool (raysvc.cluster.draft_pool) serving this worker's speculation:
    # handles, or names (an application's: a restarted worker looks them up)
    draft_actors: list[Any] = field(default_factory=list)
    names: AppNames | None = None  # named, detached workers (see the module docstring)

    def actor_options(self) -> dict[str, Any]:
        device = str(self.engine_kwargs.get("device", "auto"))
        num_gpus = self.num_gpus
        if num_gpus is None:
            gpu = device.startswith("cuda") or (device == "auto" and _cluster_has_gpus())
            num_gpus = 1.0 if gpu else 0.0
        max_seqs = int(self.engine_kwargs.get("max_num_seqs", 256))
        return dict(num_cpus=0 if num_gpus else self.num_cpus, num_gpus=num_gpus,
                    resources=dict(self.resources), max_concurrency=2 * max_seqs
                    + _WORKER_CONCURRENCY_SLACK, max_restarts=self.max_restarts)

    def threads(self) -> int | None:
        if self.torch_threads is not None:
            return self.torch_threads
        return max(int(self.num_cpus), 1)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def draining_nodes() -> dict[str, float]:
    """Ids (hex) of the nodes Ray is draining before it removes them: a preemption (a
    KubeRay pod being deleted sends one, with a deadline), or the autoscaler's v2 idle
    termination. Ray 2.60 has no public API or push notice for this: `ray.nodes()` and
    `ray.util.state` do not show it (the latter needs the dashboard); the GCS's draining
    table does, and Ray Serve, Train and Data poll it the same way."""
    from ray._private.state import state

    # node id (hex) -> the drain's deadline in epoch milliseconds, 0: none
    return {node: float(deadline) for node, deadline in state.get_draining_nodes().items()}


def start_router(max_queue_len: int = 1024, resources: dict[str, float] | None = None,
                 names: AppNames | None = None, **kwargs: Any) -> Any:
    """The router actor (no CPU reserved: it only waits on its callers and workers).
    `resources` pins it, e.g. to CPU nodes: an actor on a GPU node keeps that node from
    ever being idle, so Ray's autoscaler could not give the GPU back.

    With `names`, the router is the application's named, detached actor, restarted by Ray
    whenever it dies (it then rebuilds its state from the workers); if it exists already,
    this returns it (a restarted cluster replica re-adopts it)."""
    import ray

    options: dict[str, Any] = dict(num_cpus=0, resources=dict(resources or {}),
                                   max_concurrency=max_queue_len + 1024, max_restarts=0)
    if names is not None:
        options.update(name=names.router, namespace=names.namespace, lifetime="detached",
                       get_if_exists=True, max_restarts=-1)
    return ray.remote(Router).options(**options).remote(
        max_queue_len=max_queue_len, names=names, **kwargs)


def start_worker(worker_id: str, spec: WorkerSpec, router: Any = None) -> Any:
    import ray

    options = spec.actor_options()
    if spec.names is not None:  # found again by name; the router, too, by its name
        options.update(name=spec.names.worker(worker_id), namespace=spec.names.namespace,
                       lifetime="detached")
        router = spec.names.router
    return ray.remote(LLMWorker).options(**options).remote(
        worker_id, spec.engine_kwargs, spec.threads(), spec.stream_interval_s, router,
        spec.draft_actors, spec.stuck_timeout_s)


def add_workers(router: Any, spec: WorkerSpec, num_workers: int, prefix: str = "worker",
                timeout_s: float = 600.0) -> dict[str, Any]:
    """Start `num_workers` workers and register them with `router` once their models load.

    Returns worker id -> actor handle. Raises (after killing what it started) if a worker
    fails to start or does not register within `timeout_s`.
    """
    import ray

    workers = {f"{prefix}-{i}": start_worker(f"{prefix}-{i}", spec, router)
               for i in range(num_workers)}
    try:
        ray.get([router.add_worker.remote(wid, h) for wid, h in workers.items()],
                timeout=timeout_s)
    except BaseException:
        for handle in workers.values():
            ray.kill(handle)
        raise
    return workers
