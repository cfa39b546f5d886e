"""What crosses process boundaries in the cluster: worker facts, loads, tickets, deltas.

Plain slotted dataclasses, so Ray pickles them cheaply and every side (worker, router,
ingress) shares one definition. No torch here: the router imports this alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Overloaded(RuntimeError):
    """The router's waiting queue is full; the caller should answer 429 and retry later."""


class NoWorkers(RuntimeError):
    """No live worker can ever take this request (none registered, or all died)."""


class RouterUnavailable(RuntimeError):
    """The router did not answer in time (it is restarting, or gone): try again shortly."""


class ShuttingDown(RuntimeError):
    """The service is draining before it stops: new requests go elsewhere (HTTP 503)."""


class WorkerDied(RuntimeError):
    """The worker serving a request died after the request produced output."""


class RequestFailed(RuntimeError):
    """The request's own processing raised inside a worker's step; the worker serves on.
    Never replayed: another worker would fail the same way."""


class HandedOver(RuntimeError):
    """A draining worker gave the request back: its client continues it on another worker.
    `migrated`: the worker holds the request's KV for the next worker to take
    (`LLMWorker.take_migrated`), so the continuation recomputes nothing."""

    def __init__(self, message: str = "", migrated: bool = False) -> None:
        super().__init__(message)
        self.migrated = migrated


@dataclass(slots=True)
class WorkerInfo:
    """Facts about a worker that do not change while it lives."""

    worker_id: str
    node_id: str
    pid: int
    device: str
    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    kv_blocks_total: int
    max_num_seqs: int
    kv_bytes_per_block: int = 0  # all layers' K and V of one block (what a pull moves)


@dataclass(slots=True)
class WorkerLoad:
    """A worker's load report: its engine's counters plus the requests it is streaming."""

    running: int = 0
    waiting: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    tokens_in_flight: int = 0  # prompt + generated tokens of the requests it holds
    requests_in_flight: int = 0
    prefix_cache_hits: int = 0  # tokens found in the prefix cache
    prefix_cache_queries: int = 0  # tokens looked up
    num_preemptions: int = 0
    num_generated_tokens: int = 0  # since the worker started
    num_computed_tokens: int = 0  # tokens its forward passes computed, since it started
    # speculative decoding, since the worker started (all 0 without speculation)
    spec_num_drafts: int = 0  # verifications: one per speculating sequence per step
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_tokens_per_position: list[int] = field(default_factory=list)
    healthy: bool = True
    request_ids: list[str] = field(default_factory=list)  # what it holds (the ledger's truth)
    loras: list[str] = field(default_factory=list)  # LoRA adapters loaded in its engine
    # the pull cost model (raysvc/cluster/kv_pull.py) and what its pulls did
    prefill_tokens_per_s: float = 0.0
    kv_bytes_per_s: float = 0.0
    pull_overhead_s: float = 0.0
    kv_pulls: int = 0
    kv_pull_blocks: int = 0  # imported instead of recomputed
    kv_pull_bytes: int = 0
    kv_pull_s: float = 0.0
    kv_pull_failures: int = 0
    # live migration: requests that left with their KV / came with one, and takes that
    # failed (the continuation recomputed)
    kv_migrations_out: int = 0
    kv_migrations_in: int = 0
    kv_migration_failures: int = 0
    kv_tokens_carried: int = 0  # tokens admitted with KV computed on another worker
    lora_modules: dict[str, str] = field(default_factory=dict)  # adapters it knows -> dirs

    @classmethod
    def from_engine_stats(cls, stats: dict[str, Any], **extra: Any) -> WorkerLoad:
        return cls(running=stats["num_running"], waiting=stats["num_waiting"],
                   kv_blocks_free=stats["kv_blocks_free"], kv_blocks_total=stats["kv_blocks_total"],
                   prefix_cache_hits=stats["prefix_cache_hits"],
                   prefix_cache_queries=stats["prefix_cache_queries"],
                   num_preemptions=stats["num_preemptions"],
                   num_generated_tokens=stats["num_generated_tokens"],
                   num_computed_tokens=stats["num_computed_tokens"],
                   kv_migrations_out=stats.get("num_migrated_out", 0),
                   kv_tokens_carried=stats.get("kv_tokens_carried", 0),
                   spec_num_drafts=stats.get("spec_num_drafts", 0),
                   spec_draft_tokens=stats.get("spec_draft_tokens", 0),
                   spec_accepted_tokens=stats.get("spec_accepted_tokens", 0),
                   spec_accepted_tokens_per_position=list(
                       stats.get("spec_accepted_tokens_per_position", [])), **extra)


@dataclass(slots=True)
class AcquireRequest:
    """One request asking the router for a ticket (an item of `Router.exchange`).

    The ingress hashes the prompt's full blocks (`block_hash.hash_blocks`, the same
    function as the workers' prefix caches), so the router never sees token ids: a few
    16-byte hashes per request instead of the whole prompt.
    """

    ticket_id: str
    num_prompt_tokens: int
    n: int = 1
    block_hashes: list[bytes] = field(default_factory=list)
    retry: bool = False  # a request continued after its worker died: head of the queue
    priority: int = 0  # vLLM's: lower is served first
    tenant: str = ""  # whose request (the OpenAI `user` field): fairness among tenants
    avoid: str | None = None  # not this worker (it just handed the request over)
    lora: str | None = None  # the LoRA adapter it runs with: workers holding it are preferred


@dataclass(slots=True)
class ExchangeReply:
    """The router's answer to one `exchange` call.

    `results`: (ticket id, worker id) for each admitted ticket (or (ticket id, (worker id,
    pull source's worker id, blocks)) when the worker is to pull the prompt's prefix
    blocks from another worker first); (ticket id, None) for a
    ticket released before its acquire arrived; (ticket id, exception) for a refused one
    (Overloaded, NoWorkers, ShuttingDown). `handles`: the actor handle of each worker
    this client has not been sent yet. `incarnation` changes when the router restarts:
    the client then asks again for every ticket it still waits for (the new router never
    saw them). `block_size`: the workers' block size (None until known)."""

    incarnation: str
    results: list[tuple[str, Any]] = field(default_factory=list)
    handles: dict[str, Any] = field(default_factory=dict)
    block_size: int | None = None


@dataclass(slots=True)
class Ticket:
    """The router's answer: run request `ticket_id` on `worker` (a Ray actor handle) now."""

    ticket_id: str
    worker_id: str
    worker: Any  # ray.actor.ActorHandle of an LLMWorker
    # another worker holding more of the prompt's prefix, and how many of its blocks to
    # pull from it before starting (kv fabric); None: compute the prefix here
    pull_from: Any = None
    pull_blocks: int = 0


@dataclass(slots=True)
class SeqDelta:
    """What one sample (index) gained since the worker's previous chunk."""

    index: int
    token_ids: list[int]
    # per new token: {token_id: (logprob, rank)}; the sampled token is the first key
    logprobs: list[dict[int, tuple[float, int]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None


@dataclass(slots=True)
class StreamChunk:
    """One item of a worker's output stream: the deltas of every sample that moved."""

    num_prompt_tokens: int
    deltas: list[SeqDelta] = field(default_factory=list)
    finished: bool = False
    # per prompt token (the first None): {token id: (logprob, rank)}, in the first chunk
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] | None = None
    error: str | None = None  # the worker's engine failed: the request cannot finish
    request_error: str | None = None  # this request alone failed (RequestFailed)
    handed_over: bool = False  # the worker is leaving: continue the request elsewhere
    migrated: bool = False  # ... and it holds the request's KV for the next worker to take


@dataclass(slots=True)
class KVEventsReply:
    """A worker's prefix-cache changes since the router's last acknowledged step.

    `epoch` names the worker's incarnation (a restarted actor starts a new one). When the
    router's epoch or step is unknown to the worker, `snapshot` holds every cached hash
    instead and `batches` is empty; otherwise `batches` are (step, [(kind, hashes)]).
    """

    epoch: str
    step: int
    snapshot: set[bytes] | None = None
    batches: list[tuple[int, list[tuple[str, list[bytes]]]]] = field(default_factory=list)
