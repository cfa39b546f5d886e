"""Where the router sends a request: prefix-aware scoring against load, with a fallback.

Policies (`PlacementConfig.policy`):

- "prefix" (default): among the workers with room, pick the highest
  `prefix_weight * matched_prefix_tokens - load_weight * load_tokens`, where matched tokens
  come from the worker's `PrefixIndex` (exact KV events + pending placements) and load
  tokens are the prompt tokens + one block per sample the router has admitted there and
  not yet released (queued + running work, in tokens). A resident request costs its
  worker decode time for its whole life while a hit saves one prefill, hence the lighter
  load weight (0.25: a 288-token hit outweighs about four such requests of load).
  A worker's *load* for balancing is its running requests plus the requests routed to it
  recently (decayed with `load_half_life_s`), so a worker that owns the busier prefix
  groups counts as busy even when each request is short. If the best prefix worker's load
  exceeds the least loaded worker's by more than `balance_abs` AND `balance_rel` times,
  prefix affinity yields and the least loaded worker takes the request (SGLang's
  cache-aware router does the same with its absolute and relative thresholds); the
  prefix then lives on both, and later requests of the group split between them. A cold
  prefix (cached nowhere) also goes to the least loaded worker, which spreads groups.
  With `wait_for_prefix`, a worker that holds the prefix but has no room right now still
  wins: the request waits for it at the head of the queue rather than missing on whichever
  worker happens to free a slot first (under saturation that is what keeps the hit rate;
  the balance rule bounds the wait).
  A request with a LoRA adapter counts `lora_affinity_tokens` extra on the workers that
  hold it loaded (their load reports say which; a placement adds it at once), so an
  adapter's requests gather where it is loaded rather than loading it everywhere; the
  balance rule still sends them on when those workers run hot. (Its prefix hashes carry
  the adapter, so prefix matches are always with the same adapter.)
- "least_loaded": the old rule — fewest seats used, then fewest blocks.
- "round_robin": the next worker with room in a fixed order.
- "oracle": a benchmark reference: every request whose first prompt block is the same
  goes to one worker (first come, workers dealt round-robin), whatever the load.

Ties break on fewer seats used, fewer requests routed, then worker id: deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from raysvc.cluster.kv_pull import KVCostModel
from raysvc.cluster.messages import WorkerInfo, WorkerLoad
from raysvc.cluster.prefix_index import PrefixIndex

POLICIES = ("prefix", "least_loaded", "round_robin", "oracle")


@dataclass(slots=True)
class PlacementConfig:
    policy: str = "prefix"
    prefix_weight: float = 1.0  # per matched prompt token
    load_weight: float = 0.25  # per token of admitted, unreleased work
    balance_abs: float = 4.0  # load (requests) of the prefix's worker - the least's > this ...
    balance_rel: float = 1.2  # ... and > rel * the least's  => least loaded takes it
    load_half_life_s: float = 30.0  # load = running requests + recently routed, decayed
    wait_for_prefix: bool = True  # a full worker holding the prefix is worth waiting for
    # a worker with the request's LoRA adapter loaded scores as if it held this many more
    # prompt tokens (a load from disk and a slot swap avoided), unless it runs hot
    lora_affinity_tokens: float = 256.0
    # kv fabric: a worker may pull the prompt's prefix blocks another worker holds, when
    # its cost model says the pull beats recomputing them; such blocks score this much of
    # a local hit (a pull is cheap, not free). 0 turns pulls off.
    pull_weight: float = 0.7
    min_pull_blocks: int = 2
    pending_ttl_s: float = 30.0  # a placement counts as cached until events confirm it
    max_pending_blocks: int = 65536  # per worker

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"placement policy must be one of {POLICIES}, not {self.policy!r}")


@dataclass(slots=True)
class WorkerEntry:
    """The router's ledger for one worker: what it admitted there, and its prefix index."""

    info: WorkerInfo
    handle: Any
    max_seqs: int
    index: PrefixIndex
    load: WorkerLoad = field(default_factory=WorkerLoad)
    admitted: dict[str, tuple[int, int]] = field(default_factory=dict)  # ticket -> blocks, seqs
    used_blocks: int = 0
    used_seqs: int = 0
    requests_routed: int = 0
    missed_reports: int = 0
    draining: bool = False
    suspect: bool = False  # a caller saw it fail; not placed on until its health is known
    recent: float = 0.0  # requests routed here, decayed with the load half-life ...
    recent_time: float = 0.0  # ... as of this time
    shed_after: float = 0.0  # not asked to shed work again before this (monotonic)
    loras: set[str] = field(default_factory=set)  # LoRA adapters loaded (reported, placed)
    pull_cost: KVCostModel | None = None  # its KV pull cost model (from its load reports)

    def recent_at(self, now: float, half_life_s: float) -> float:
        return self.recent * 0.5 ** ((now - self.recent_time) / half_life_s)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def block_size(self) -> int:
        return self.info.block_size

    @property
    def kv_blocks_total(self) -> int:
        return self.info.kv_blocks_total

    def need(self, num_prompt_tokens: int, n: int) -> tuple[int, int]:
        """Blocks and seats a request holds here: its prompt's blocks plus one block per sample
        to grow into; capped at the whole worker, so any request fits an idle worker."""
        blocks = -(-num_prompt_tokens // self.info.block_size) + n
        return min(blocks, self.info.kv_blocks_total), min(n, self.max_seqs)

    def stats(self) -> dict[str, Any]:
        """This worker's row of /cluster/stats: facts, its last load report, the ledger."""
        info, load = self.info, self.load
        return {
            "worker_id": info.worker_id, "node_id": info.node_id, "pid": info.pid,
            "device": info.device, "running": load.running, "waiting": load.waiting,
            "kv_blocks_free": load.kv_blocks_free, "kv_blocks_total": load.kv_blocks_total,
            "tokens_in_flight": load.tokens_in_flight,
            "requests_in_flight": load.requests_in_flight,
            "requests_admitted": len(self.admitted), "requests_routed": self.requests_routed,
            "prefix_cache_hits": load.prefix_cache_hits,
            "prefix_cache_queries": load.prefix_cache_queries,
            "num_preemptions": load.num_preemptions,
            "num_generated_tokens": load.num_generated_tokens,
            "num_computed_tokens": load.num_computed_tokens,
            "spec_num_drafts": load.spec_num_drafts,
            "spec_draft_tokens": load.spec_draft_tokens,
            "spec_accepted_tokens": load.spec_accepted_tokens,
            "spec_acceptance_rate": (load.spec_accepted_tokens / load.spec_draft_tokens
                                     if load.spec_draft_tokens else None),
            "index_blocks": len(self.index.cached), "index_pending": len(self.index.pending),
            "draining": self.draining, "state": "draining" if self.draining else "ready",
            "loras": sorted(self.loras),
            # the kv fabric: prefix blocks pulled from other workers instead of recomputed
            "kv_pulls": load.kv_pulls, "kv_pull_blocks": load.kv_pull_blocks,
            "kv_pull_bytes": load.kv_pull_bytes, "kv_pull_s": round(load.kv_pull_s, 6),
            "kv_pull_failures": load.kv_pull_failures,
            # live migration off draining workers
            "kv_migrations_out": load.kv_migrations_out,
            "kv_migrations_in": load.kv_migrations_in,
            "kv_migration_failures": load.kv_migration_failures,
            "kv_tokens_carried": load.kv_tokens_carried,
            "prefill_tokens_per_s": round(load.prefill_tokens_per_s, 1),
            "kv_bytes_per_s": round(load.kv_bytes_per_s),
        }

    def fits(self, num_prompt_tokens: int, n: int) -> bool:
        """`has_room(*need(...))` in one call (the router asks it of every worker)."""
        blocks = min(-(-num_prompt_tokens // self.info.block_size) + n,
                     self.info.kv_blocks_total)
        return (not self.draining and not self.suspect
                and self.used_seqs + min(n, self.max_seqs) <= self.max_seqs
                and self.used_blocks + blocks <= self.info.kv_blocks_total)

    def has_room(self, blocks: int, seqs: int) -> bool:
        return (not self.draining and not self.suspect and self.used_seqs + seqs <= self.max_seqs
                and self.used_blocks + blocks <= self.info.kv_blocks_total)


def pull_cost(info: WorkerInfo, load: WorkerLoad) -> KVCostModel | None:
    """A worker's pull cost model, from a load report (None while it reports none)."""
    if not (load.prefill_tokens_per_s and load.kv_bytes_per_s and info.kv_bytes_per_block):
        return None
    return KVCostModel(info.block_size, info.kv_bytes_per_block, load.prefill_tokens_per_s,
                       load.kv_bytes_per_s, load.pull_overhead_s)


def _pull_worth(w: WorkerEntry, blocks: int) -> bool:
    """Would worker `w` get `blocks` prefix blocks faster by pulling them than by computing
    them? By its reported cost model; no report yet: no."""
    return w.pull_cost is not None and w.pull_cost.worth(blocks)


def _least_loaded_key(w: WorkerEntry) -> tuple:
    return (w.used_seqs / w.max_seqs, w.used_blocks / w.kv_blocks_total, w.requests_routed,
            w.worker_id)


class Placer:
    """Chooses a worker among those with room; keeps the little state policies need."""

    def __init__(self, config: PlacementConfig) -> None:
        self.config = config
        # the last choice's pull: (the worker holding more of the prefix, its matched
        # blocks), or None (set by every `choose`)
        self.pull: tuple[WorkerEntry, int] | None = None
        self._rr = 0
        self._oracle: dict[bytes, str] = {}  # first block hash -> worker id

    def choose(self, all_workers: list[WorkerEntry], fits: list[WorkerEntry],
               hashes: list[bytes], now: float | None = None, lora: str | None = None,
               avoided: WorkerEntry | None = None) -> tuple[WorkerEntry | None, int]:
        """The chosen worker (None: none fits) and its matched prefix blocks. `lora`: the
        request's adapter (policy "prefix" prefers workers that hold it). `avoided`: a
        worker not to place on (it just handed the request over) that may still be a
        pull's source. Sets `pull`."""
        self.pull = None
        policy = self.config.policy
        now = time.monotonic() if now is None else now
        if policy == "oracle" and hashes:
            ids = sorted(w.worker_id for w in all_workers)
            owner = self._oracle.setdefault(hashes[0], ids[len(self._oracle) % len(ids)])
            pick = next((w for w in fits if w.worker_id == owner), None)
            return pick, (pick.index.match(hashes, now) if pick else 0)
        if not fits:
            return None, 0
        if policy == "round_robin":
            ordered = sorted(fits, key=lambda w: w.worker_id)
            ids = sorted(w.worker_id for w in all_workers)
            start = ids[self._rr % len(ids)] if ids else ""
            pick = next((w for w in ordered if w.worker_id >= start), ordered[0])
            self._rr = ids.index(pick.worker_id) + 1 if pick.worker_id in ids else self._rr + 1
            return pick, pick.index.match(hashes, now)
        if policy == "least_loaded" or not (hashes or lora):
            pick = min(fits, key=_least_loaded_key)
            matched = pick.index.match(hashes, now)
        else:
            pick, matched = self._by_prefix(all_workers, fits, hashes, now, lora, avoided)
        if pick is not None:
            self._routed(pick, now)
        return pick, matched

    def _by_prefix(self, all_workers: list[WorkerEntry], fits: list[WorkerEntry],
                   hashes: list[bytes], now: float, lora: str | None = None,
                   avoided: WorkerEntry | None = None) -> tuple[WorkerEntry | None, int]:
        # Two plain passes over the workers (loads and matches, then scores), few helper
        # calls: this runs once per admission, for every worker (the router's cost per
        # request grows with the fleet).
        cfg = self.config
        half_life = cfg.load_half_life_s
        fitting = {id(w) for w in fits}
        # a full worker still competes: waiting for the one holding the prefix beats a
        # miss elsewhere (once it runs hot, the balance rule below sends the request on)
        anyone = cfg.wait_for_prefix
        loads: dict[int, float] = {}
        matches: dict[int, int] = {}
        lo = float("inf")
        holder, most = None, 0  # the worker holding the longest prefix (a pull's source)
        for w in all_workers:
            load = w.used_seqs
            if w.recent:
                load += w.recent * 0.5 ** ((now - w.recent_time) / half_life)
            loads[id(w)] = load
            lo = min(lo, load)
            if hashes and not w.suspect:
                m = matches[id(w)] = w.index.match(hashes, now)
                if m > most:
                    holder, most = w, m
        if hashes and avoided is not None and not avoided.suspect:
            m = avoided.index.match(hashes, now)  # a source, never a candidate
            if m > most:
                holder, most = avoided, m
        best, best_key, matched = None, None, 0
        for w in all_workers:
            if (w.draining or w.suspect) if anyone else id(w) not in fitting:
                continue
            m = matches.get(id(w), 0)
            reach = m
            if cfg.pull_weight and most - m >= cfg.min_pull_blocks and _pull_worth(w, most - m):
                reach = m + cfg.pull_weight * (most - m)
            score = (cfg.prefix_weight * reach - cfg.load_weight * w.used_blocks) * w.block_size
            if lora is not None and lora in w.loras:
                score += cfg.lora_affinity_tokens
            key = (-score, loads[id(w)], w.requests_routed, w.worker_id)
            if best_key is None or key < best_key:
                best, best_key, matched = w, key, m
        if best is None:
            return None, 0
        hi = loads[id(best)]
        warm = matched > 0 or (lora is not None and lora in best.loras)
        if not warm or (hi - lo > cfg.balance_abs and hi > cfg.balance_rel * lo):
            # cold prefix (and adapter), or its worker runs hot: the least loaded (recently)
            # takes it -- and may pull the prefix from where it is
            if not fits:
                return None, 0
            best = min(fits, key=lambda w: (loads[id(w)], w.worker_id))
            matched = matches.get(id(best), 0)
        elif id(best) not in fitting:
            return None, 0  # the head of the queue waits for its prefix's worker
        if (cfg.pull_weight and holder is not None and holder is not best
                and most - matched >= cfg.min_pull_blocks and _pull_worth(best, most - matched)):
            self.pull = (holder, most)
        return best, matched

    def _routed(self, w: WorkerEntry, now: float) -> None:
        w.recent = w.recent_at(now, self.config.load_half_life_s) + 1.0
        w.recent_time = now
