"""The draft-model actor pool: speculative proposals served by their own Ray actors.

Drafts run apart from the target workers so that they scale and fail on their own. Each
`DraftActor` owns a draft engine (the in-process `DraftModelProposer`: model, paged KV
pool, rollback); a worker's `DraftPoolProposer` pins each of its sequences to one actor
and makes one call per step per actor, carrying all of that worker's sequences pinned
there: the tokens the actor has not seen yet in, k proposals out.

Failure never costs a request: an actor that dies or does not answer in time yields no
proposals for that step (those sequences decode plainly). It is then left alone for a
back-off that doubles with each failure in a row (so a dead actor does not stall every
step for a timeout), and its sequences are unpinned: the next step pins them to a live
actor and sends them in full (re-seeding it). A restarted actor (`max_restarts=-1`) takes
new sequences again once its back-off has passed.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass

import ray
import torch

from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.sequence import Request, Sequence
from raysvc.engine.spec.proposal import Proposal

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class DraftItem:
    """One sequence in a propose call."""

    key: str
    known: int  # leading tokens the actor already holds (0: send all; the actor re-seeds)
    new_tokens: list[int]  # token_ids[known:]
    num_prompt_tokens: int
    index: int  # sample index, for per-sample seeds
    params: dict  # SamplingParams fields that shape the draft's distribution
    k: int


class DraftActor:
    """Ray actor: a draft engine serving proposals for sequences of many workers."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 block_size: int = 16, max_model_len: int = 4096, capacity_tokens: int = 65536,
                 num_threads: int | None = None) -> None:
        from raysvc.engine.loading import draft_dtype, resolve_device, resolve_model_path
        from raysvc.engine.spec.draft_model import DraftModelProposer
        from raysvc.models.attention import make_backend
        from raysvc.models.config import ModelConfig, parse_dtype

        if num_threads:
            torch.set_num_threads(num_threads)
        path = resolve_model_path(model or "tiny-draft")
        config = ModelConfig.from_dir(path)
        dev = resolve_device(device)
        max_len = min(max_model_len, config.max_position_embeddings)
        dt = draft_dtype(parse_dtype(dtype, config.dtype), dev)
        self.proposer = DraftModelProposer(path, dt, dev, make_backend("auto", dev), block_size,
                                           max_len, capacity_tokens, config.vocab_size)
        self.vocab_size = config.vocab_size
        self.seqs: dict[str, Sequence] = {}  # key -> the target sequence as seen here
        self._ids = itertools.count()

    def ready(self) -> int:
        return self.vocab_size

    def propose(self, items: list[DraftItem], released: list[str]) -> list:
        """Per item: None (unknown sequence: resend in full), or (tokens, probs | None)."""
        for key in released:
            seq = self.seqs.pop(key, None)
            if seq is not None:
                self.proposer.release(seq)
        seqs, ks, slots = [], [], []
        results: list = [None] * len(items)
        for i, item in enumerate(items):
            seq = self.seqs.get(item.key)
            if seq is None:
                if item.known:
                    continue  # this actor restarted and lost the sequence
                params = SamplingParams(**item.params)
                seq = Request(item.key, None, item.new_tokens[: item.num_prompt_tokens],
                              params, ()).seqs[0]
                seq.index = item.index
                seq.seq_id = next(self._ids)
                self.seqs[item.key] = seq
            seq.token_ids[item.known:] = item.new_tokens
            seqs.append(seq)
            ks.append(item.k)
            slots.append(i)
        for i, proposal in zip(slots, self.proposer.propose(seqs, ks), strict=True):
            if proposal is None:
                results[i] = ([], None)
            else:
                probs = None if proposal.probs is None else proposal.probs.cpu()
                results[i] = (proposal.tokens, probs)
        return results


class DraftPoolProposer:
    """Worker side of the pool; has the in-process proposer's interface."""

    def __init__(self, actors: list, timeout_s: float = 5.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        self.actors = actors
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.prefix = uuid.uuid4().hex[:8]  # keys unique across the workers sharing actors
        self.pinned: dict[int, int] = {}  # seq_id -> actor index
        self.known: dict[int, int] = {}  # seq_id -> tokens its actor holds
        self.released: dict[int, list[str]] = {i: [] for i in range(len(actors))}
        self.load = [0] * len(actors)
        self.down_until = [0.0] * len(actors)  # monotonic time an actor may be called again
        self.failures_in_row = [0] * len(actors)
        self.failures = 0

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal | None]:
        now = time.monotonic()
        live = [a for a in range(len(self.actors)) if self.down_until[a] <= now]
        by_actor: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            a = self.pinned.get(seq.seq_id)
            if a is None:
                if not live:
                    continue  # every actor is backing off: this sequence decodes plainly
                a = min(live, key=self.load.__getitem__)  # the fewest sequences
                self.pinned[seq.seq_id] = a
                self.load[a] += 1
            if self.down_until[a] <= now:
                by_actor.setdefault(a, []).append(i)
        calls = {}
        for a, idx in by_actor.items():
            items = [self._item(seqs[i], ks[i]) for i in idx]
            calls[a] = self.actors[a].propose.remote(items, self.released[a])
            self.released[a] = []
        out: list[Proposal | None] = [None] * len(seqs)
        for a, ref in calls.items():
            try:
                results = ray.get(ref, timeout=self.timeout_s)
            except Exception as e:  # died, restarting or slow: plain decoding this step
                self._failed(a, e)
                continue
            self.failures_in_row[a] = 0
            for i, result in zip(by_actor[a], results, strict=True):
                seq = seqs[i]
                if result is None:
                    self.known[seq.seq_id] = 0
                    continue
                self.known[seq.seq_id] = seq.num_tokens
                tokens, probs = result
                if tokens:
                    out[i] = Proposal(tokens, probs)
        return out

    def _failed(self, a: int, error: Exception) -> None:
        """Back off from actor `a` and unpin its sequences (re-seeded wherever they land)."""
        self.failures += 1
        self.failures_in_row[a] += 1
        backoff = min(self.backoff_s * 2 ** (self.failures_in_row[a] - 1), self.max_backoff_s)
        self.down_until[a] = time.monotonic() + backoff
        logger.warning("draft actor %d failed (%r); its sequences decode plainly or move; "
                       "retrying it in %.1fs", a, error, backoff)
        for seq_id in [s for s, pinned in self.pinned.items() if pinned == a]:
            self._unpin(seq_id)

    def _item(self, seq: Sequence, k: int) -> DraftItem:
        known = min(self.known.get(seq.seq_id, 0), seq.num_tokens)
        p = seq.request.params
        params = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                  "min_p": p.min_p, "seed": p.seed}
        return DraftItem(f"{self.prefix}:{seq.seq_id}", known, seq.token_ids[known:],
                         seq.num_prompt_tokens, seq.index, params, k)

    def _unpin(self, seq_id: int) -> None:
        a = self.pinned.pop(seq_id, None)
        self.known.pop(seq_id, None)
        if a is not None:
            self.load[a] -= 1
            # if the actor still holds it (a slow call, not a death), it frees it next call
            self.released[a].append(f"{self.prefix}:{seq_id}")

    def release(self, seq: Sequence) -> None:
        self._unpin(seq.seq_id)


def start_draft_pool(num_actors: int, model: str | None = None, num_cpus: float = 1,
                     num_gpus: float = 0, names: list[str] | None = None,
                     **actor_kwargs) -> list:
    """Start `num_actors` draft actors (restarted by Ray when they die) and wait for them.
    With `names`, they are named and detached, and live ones of those names are reused."""
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1)(DraftActor)
    if names is None:
        actors = [cls.remote(model=model, **actor_kwargs) for _ in range(num_actors)]
    else:
        from raysvc.cluster.actors import NAMESPACE

        actors = [cls.options(name=name, namespace=NAMESPACE, lifetime="detached",
                              get_if_exists=True).remote(model=model, **actor_kwargs)
                  for name in names[:num_actors]]
    ray.get([a.ready.remote() for a in actors], timeout=300)
    return actors
