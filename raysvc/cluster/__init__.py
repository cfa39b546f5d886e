"""Ray actors: `LLMWorker` (one device, one engine) and `Router` (the cluster's queue).

Tokens flow worker -> caller; the router only decides where and when (see DESIGN.md).
"""

from raysvc.cluster.client import ClusterClient
from raysvc.cluster.launch import WorkerSpec, add_workers, start_router
from raysvc.cluster.messages import (
    NoWorkers,
    Overloaded,
    SeqDelta,
    StreamChunk,
    Ticket,
    WorkerDied,
    WorkerInfo,
    WorkerLoad,
)
from raysvc.cluster.router import Router
from raysvc.cluster.worker import LLMWorker

__all__ = ["ClusterClient", "LLMWorker", "NoWorkers", "Overloaded", "Router", "SeqDelta",
           "StreamChunk", "Ticket", "WorkerDied", "WorkerInfo", "WorkerLoad", "WorkerSpec",
           "add_workers", "start_router"]
