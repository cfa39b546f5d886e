"""`LLMWorker`: a Ray actor that owns one device and one `AsyncEngine`.

The engine runs token ids only (`skip_tokenizer_init=True`): the ingress tokenizes,
detokenizes and applies stop strings, so a worker never spends its host thread on text.

Outputs leave through *channels*: a caller process opens one channel per worker (a Ray
streaming generator, `open_channel`) and then `submit`s requests into it. After every
engine step the worker yields ONE item per channel holding the new tokens of all of that
channel's requests that moved. A Ray message per step per caller, rather than per token
per request, is what keeps the HTTP path's overhead small next to the engine's work; and
when a caller falls behind, steps merge into bigger items instead of queueing up.
Closing a channel (its caller left or died) aborts its requests and frees their blocks.

With `draft_actors`, the engine's speculative proposals come from the draft-model actor
pool (`raysvc.cluster.draft_pool`) instead of a draft model in this process.

The engine's KV events go to a `KVEventLog` that the router long-polls (`kv_events`), so
the router's prefix index mirrors this worker's cache exactly. A worker given its router
re-joins it by itself when Ray restarts the actor (`max_restarts`). The router and the
draft actors may be given by name (named actors of one application): then a restarted
worker finds them again whatever happened to the process that created it, and nothing
it needs to restart lives in the object store.

Draining, a worker moves its running requests out with their KV (`migrate`, live
migration): each stream ends with a migrated hand-over mark, the worker keeps the KV
until the worker its continuation lands on takes it (`take_migrated`), and that one
resumes the sequence after exactly those tokens.

The worker is the truth about its own requests (`requests`, and their ids in every load
report): a restarted router rebuilds its admission ledger from them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from raysvc.cluster.actors import actor, was_restarted
from raysvc.cluster.kv_pull import KVPuller, measure_cost_model
from raysvc.cluster.messages import (
    HandedOver,
    KVEventsReply,
    RequestFailed,
    SeqDelta,
    StreamChunk,
    WorkerInfo,
    WorkerLoad,
)
from raysvc.cluster.prefix_index import KVEventLog
from raysvc.engine.outputs import merge_outputs

logger = logging.getLogger(__name__)


@dataclass
class _ChannelState:
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    latest: dict[str, Any] = field(default_factory=dict)  # request id -> newest RequestOutput
    sent: dict[str, dict[int, tuple[int, bool]]] = field(default_factory=dict)
    pumps: dict[str, asyncio.Task] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    last_sent: dict[str, float] = field(default_factory=dict)  # request id -> monotonic time


class LLMWorker:
    def __init__(self, worker_id: str, engine_kwargs: dict[str, Any] | None = None,
                 torch_threads: int | None = None, stream_interval_s: float = 0.0,
                 router: Any = None, draft_actors: list[Any] | None = None,
                 stuck_timeout_s: float = 300.0) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from raysvc.engine.async_engine import AsyncEngine

        proposer = None
        if draft_actors:  # speculation served by the draft-model actor pool
            from raysvc.cluster.draft_pool import DraftPoolProposer

            proposer = DraftPoolProposer([actor(a) for a in draft_actors])
        self.engine = AsyncEngine(proposer=proposer,
                                  **{**(engine_kwargs or {}), "skip_tokenizer_init": True})
        llm = self.engine.engine
        self.worker_id = worker_id
        self.stream_interval_s = stream_interval_s
        self.stuck_timeout_s = stuck_timeout_s
        self._info = WorkerInfo(
            worker_id=worker_id, node_id=_node_id(), pid=os.getpid(), device=str(llm.device),
            model=str(llm.model_path), max_model_len=llm.max_model_len,
            vocab_size=llm.model_config.vocab_size, block_size=llm.config.block_size,
            kv_blocks_total=llm.block_manager.num_blocks, max_num_seqs=llm.config.max_num_seqs,
            kv_bytes_per_block=llm.runner.kv_cache.data[:, :, 0].numel()
            * llm.runner.kv_cache.data.element_size())
        self.puller = KVPuller(self.engine, measure_cost_model(llm))
        self._channels: dict[str, _ChannelState] = {}
        self._tokens: dict[str, int] = {}  # request id -> prompt + generated tokens so far
        self._shape: dict[str, tuple[int, int]] = {}  # request id -> (prompt tokens, n)
        self._failure: BaseException | None = None
        # request id -> (its KV, when to drop it): migrated, waiting to be taken
        self._migrated: dict[str, tuple[Any, float]] = {}
        self._kv_log = KVEventLog()
        self._kv_news: asyncio.Event | None = None
        llm.subscribe_kv_events(self._kv_log.record)
        if router is not None and was_restarted():
            import ray

            actor(router).add_worker.remote(worker_id,
                                             ray.get_runtime_context().current_actor)

    def info(self) -> WorkerInfo:
        return self._info

    async def load(self) -> WorkerLoad:
        stats = await self.engine.stats()
        p, cost = self.puller, self.puller.cost
        return WorkerLoad.from_engine_stats(
            stats, tokens_in_flight=sum(self._tokens.values()),
            requests_in_flight=len(self._tokens), healthy=self._problem() is None,
            request_ids=list(self._tokens), loras=self.engine.engine.loaded_loras(),
            lora_modules=self.engine.engine.lora_modules(),
            prefill_tokens_per_s=cost.prefill_tokens_per_s, kv_bytes_per_s=cost.kv_bytes_per_s,
            pull_overhead_s=cost.pull_overhead_s, kv_pulls=p.pulls, kv_pull_blocks=p.blocks,
            kv_pull_bytes=p.bytes, kv_pull_s=p.seconds, kv_pull_failures=p.failures,
            kv_migrations_in=p.migrations_in, kv_migration_failures=p.migration_failures)

    def requests(self) -> list[tuple[str, int, int]]:
        """(request id, prompt tokens, samples) of every request here: a router rebuilding
        its ledger after a restart admits exactly these."""
        return [(rid, *self._shape[rid]) for rid in self._tokens if rid in self._shape]

    async def health(self) -> bool:
        """Raises if the engine's step loop failed or is stuck in one step, so the router
        drops this worker (and streams waiting on it fail over)."""
        problem = self._problem()
        if problem is not None:
            raise RuntimeError(f"worker {self.worker_id}: {problem}")
        return True

    def _problem(self) -> str | None:
        if self._failure is not None:
            return f"engine failed: {self._failure!r}"
        if self.engine.step_running_s > self.stuck_timeout_s:
            return (f"engine stuck: one step has run {self.engine.step_running_s:.0f}s "
                    f"(bound {self.stuck_timeout_s:g}s)")
        return None

    async def kv_events(self, epoch: str, acked_step: int, wait_s: float = 1.0) -> KVEventsReply:
        """The KV events after `acked_step` (or a snapshot); waits up to `wait_s` for some."""
        if self._kv_news is None:  # bind to this actor's event loop on first use
            loop, news = asyncio.get_running_loop(), asyncio.Event()
            self._kv_news = news
            self._kv_log.on_change = lambda: loop.call_soon_threadsafe(news.set)
        if not self._kv_log.has_news(epoch, acked_step):
            self._kv_news.clear()
            if not self._kv_log.has_news(epoch, acked_step):
                try:
                    await asyncio.wait_for(self._kv_news.wait(), wait_s)
                except TimeoutError:
                    pass
        return self._kv_log.since(epoch, acked_step)

    async def cached_block_hashes(self) -> set[bytes]:
        """The engine's own set of cached block hashes, read on its step thread."""
        return await self.engine.cached_block_hashes()

    # -- requests ----------------------------------------------------------------------

    async def open_channel(self, channel_id: str) -> AsyncIterator[list[tuple[str, StreamChunk]]]:
        """Stream [(request id, chunk)] batches for the requests submitted to this channel."""
        ch = self._channels.setdefault(channel_id, _ChannelState())
        due: float | None = None  # when a held-back request must be sent
        try:
            while True:
                timeout = None if due is None else max(due - time.monotonic(), 0.0)
                try:
                    await asyncio.wait_for(ch.moved.wait(), timeout)
                except TimeoutError:
                    pass
                ch.moved.clear()
                batch, due = self._drain(ch)
                if batch:
                    yield batch
        finally:
            self._channels.pop(channel_id, None)
            for request_id, task in list(ch.pumps.items()):
                task.cancel()  # leaving the engine's stream aborts the request there
                self._tokens.pop(request_id, None)
                self._shape.pop(request_id, None)

    async def submit(self, channel_id: str, request_id: str, prompt_token_ids: list[int],
                     params: dict[str, Any], priority: int = 0,
                     pull: tuple[Any, list[bytes]] | None = None,
                     resume: tuple[Any, str] | None = None) -> None:
        """Start a request whose outputs go to `channel_id`; ValueError for bad params.
        `priority` orders the engine's waiting queue (lower first). `pull`: (another
        worker, block hashes) to import the prompt's prefix from first (kv_pull.py).
        `resume`: (a draining worker, the request id it migrated) whose KV this prompt
        continues from."""
        from raysvc.engine.sampling_params import SamplingParams

        ch = self._channels.setdefault(channel_id, _ChannelState())
        # known (load reports, the ledger) from now on, not once the engine took it
        self._tokens[request_id] = len(prompt_token_ids)
        self._shape[request_id] = (len(prompt_token_ids), int(params.get("n", 1)))
        try:
            kv = None
            if resume is not None:
                kv = await self.puller.take(*resume)
            elif pull is not None:
                await self.puller.pull(*pull)
            stream = await self.engine.add_request(
                request_id, prompt_token_ids, SamplingParams(**params, output_kind="delta"),
                priority, kv)
        except BaseException:
            self._tokens.pop(request_id, None)
            self._shape.pop(request_id, None)
            raise
        ch.sent[request_id] = {}
        ch.pumps[request_id] = asyncio.create_task(self._pump(ch, request_id, stream))

    async def submit_many(self, channel_id: str, batch: list[tuple]
                          ) -> list[BaseException | None]:
        """`submit` for a batch of (request id, prompt, params, priority[, pull, resume]):
        an ingress process keeps one such call in flight per worker, so a busy ingress
        makes few calls. Each item's error (ValueError for bad params, the engine's failure) is
        returned in its place, None where it started."""
        results = await asyncio.gather(*(self.submit(channel_id, *item) for item in batch),
                                       return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def export_kv(self, block_hashes: list[bytes]):
        """The KV of the leading blocks of a prefix chain held here (a `KVBlocks`, its
        buffer handed over by Ray's object store without a copy), or None."""
        return await self.engine.export_kv(block_hashes)

    async def import_kv(self, kv) -> int:
        """Take in another worker's prefix blocks (same model, dtype, block size); how many
        were new here. They show in this worker's KV events like blocks it computed."""
        return await self.engine.import_kv(kv)

    async def migrate(self, hold_s: float = 60.0) -> tuple[int, int]:
        """Move every request out (this worker is draining): each running one of a
        single sample leaves the engine with its KV, held here for `hold_s` for the
        worker its continuation lands on (`take_migrated`); one that has computed
        nothing yet is handed over plainly. Requests of n > 1 samples stay (they finish
        here, or are handed over at the drain's deadline). Returns (migrated, handed over)."""
        live = [rid for ch in self._channels.values() for rid, task in ch.pumps.items()
                if not task.done() and rid not in ch.failed]
        moved, nothing = await self.engine.migrate_out(live)
        drop_at = time.monotonic() + hold_s
        for request_id, kv in moved.items():
            self._migrated[request_id] = (kv, drop_at)
        handed = await self.hand_over(nothing) if nothing else 0
        if moved:
            logger.info("worker %s: migrated %d request(s) with their KV (%.1f MiB)",
                        self.worker_id, len(moved),
                        sum(kv.nbytes for kv in moved.values()) / 2**20)
        return len(moved), handed

    def take_migrated(self, request_id: str):
        """The KV of a request migrated off this worker (a `SequenceKV`, handed over by
        Ray's object store), now no longer held here; None if it is not (any more)."""
        held = self._migrated.pop(request_id, None)
        return None if held is None else held[0]

    def migrations_held(self) -> int:
        """Migrated KV still waiting to be taken (what a drain waits for)."""
        now = time.monotonic()
        for request_id in [r for r, (_, drop_at) in self._migrated.items() if drop_at < now]:
            logger.warning("worker %s: nobody took %s's migrated KV; dropping it",
                           self.worker_id, request_id)
            del self._migrated[request_id]
        return len(self._migrated)

    async def add_lora(self, name: str, path: str) -> None:
        """Know (and load) an adapter at run time; ValueError naming the file if bad."""
        from raysvc.models.lora import LoRARequest

        await self.engine.add_lora(LoRARequest(name, 0, path))

    async def remove_lora(self, name: str) -> None:
        """New requests may no longer name it; running ones finish with it."""
        try:
            await self.engine.remove_lora(name)
        except KeyError:
            pass

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def finish_sample(self, request_id: str, index: int) -> None:
        """End sample `index` of an n > 1 request (its ingress found a stop string): its
        blocks are freed now, the request's other samples go on."""
        await self.engine.finish_sample(request_id, index)

    async def hand_over(self, request_ids: list[str] | None = None) -> int:
        """End every request here (or those of `request_ids`) with a hand-over mark (this
        worker is being drained past its deadline, or sheds work to a joining worker):
        each stream gets what it has so far, then the mark, and its client continues it
        on another worker with prompt + tokens so far. Returns how many."""
        only = None if request_ids is None else set(request_ids)
        count = 0
        for ch in self._channels.values():
            for request_id, task in list(ch.pumps.items()):
                if only is not None and request_id not in only:
                    continue
                held = ch.latest.get(request_id)
                if request_id in ch.failed or task.done() or (held and held.finished):
                    continue  # finished already: its last chunk goes out as usual
                ch.failed[request_id] = HandedOver(f"worker {self.worker_id} is draining")
                task.cancel()  # leaving the engine's stream aborts the request there
                count += 1
            ch.moved.set()
        return count

    async def shed(self, max_requests: int) -> int:
        """Hand over up to `max_requests` requests that have not started (waiting in the
        engine, nothing computed): the router moves a busy worker's backlog to one with
        room, such as a worker that just joined. Returns how many were handed over."""
        request_ids = await self.engine.not_started(max_requests)
        return await self.hand_over(request_ids) if request_ids else 0

    async def _pump(self, ch: _ChannelState, request_id: str, stream) -> None:
        from raysvc.engine.async_engine import (
            EngineDeadError,
            RequestFailedError,
            RequestMigratedError,
        )

        try:
            async for out in stream:  # delta outputs: pile them up until the channel sends
                held = ch.latest.get(request_id)
                ch.latest[request_id] = out if held is None else merge_outputs(held, out)
                ch.moved.set()
        except RequestMigratedError:  # left with its KV: continued elsewhere
            ch.failed[request_id] = HandedOver(f"worker {self.worker_id} is draining",
                                               migrated=True)
            ch.moved.set()
        except RequestFailedError as e:  # this request alone: the engine serves on
            ch.failed[request_id] = RequestFailed(str(e))
            ch.moved.set()
        except EngineDeadError as e:
            self._failure = e
            ch.failed[request_id] = e
            ch.moved.set()
        except Exception as e:  # a bug here must end this request, not leave it held
            logger.exception("worker %s: streaming %s failed", self.worker_id, request_id)
            ch.failed[request_id] = RequestFailed(f"streaming its output failed: {e!r}")
            ch.moved.set()

    def _drain(self, ch: _ChannelState) -> tuple[list[tuple[str, StreamChunk]], float | None]:
        """New outputs of the channel's requests, and when to look again for held ones.

        With `stream_interval_s`, a request's first tokens and its end go out at once;
        in between it is sent at most once per interval (its steps merge meanwhile).
        """
        now, interval = time.monotonic(), self.stream_interval_s
        batch, due = [], None
        for request_id, out in list(ch.latest.items()):
            last = ch.last_sent.get(request_id)
            if (interval and last is not None and not out.finished and now - last < interval
                    and request_id not in ch.failed):
                due = min(due or last + interval, last + interval)
                continue
            del ch.latest[request_id]
            ch.last_sent[request_id] = now
            sent = ch.sent[request_id]
            chunk = chunk_since(out, sent)
            self._tokens[request_id] = len(out.prompt_token_ids) + sum(
                n for n, _ in sent.values())
            batch.append((request_id, chunk))
            if chunk.finished:
                self._forget(ch, request_id)
        for request_id, error in ch.failed.items():
            if isinstance(error, HandedOver):
                batch.append((request_id, StreamChunk(0, [], True, handed_over=True,
                                                      migrated=error.migrated)))
            elif isinstance(error, RequestFailed):
                batch.append((request_id, StreamChunk(0, [], True, request_error=str(error))))
            else:
                batch.append((request_id, StreamChunk(0, [], True, error=repr(error))))
            ch.latest.pop(request_id, None)
            self._forget(ch, request_id)
        ch.failed.clear()
        return batch, due

    def _forget(self, ch: _ChannelState, request_id: str) -> None:
        ch.sent.pop(request_id, None)
        ch.pumps.pop(request_id, None)
        ch.last_sent.pop(request_id, None)
        self._tokens.pop(request_id, None)
        self._shape.pop(request_id, None)


def chunk_since(out, sent: dict[int, tuple[int, bool]]) -> StreamChunk:
    """A delta output (`output_kind="delta"`) as a stream chunk; `sent` keeps, per sample
    index, (tokens sent so far, finish reported), and skips samples with nothing new."""
    chunk = StreamChunk(num_prompt_tokens=len(out.prompt_token_ids), finished=out.finished)
    if out.prompt_logprobs is not None:  # a delta output carries them once
        chunk.prompt_logprobs = [None if e is None else
                                 {tid: (lp.logprob, lp.rank) for tid, lp in e.items()}
                                 for e in out.prompt_logprobs]
    for comp in out.outputs:
        count, reported_finish = sent.get(comp.index, (0, False))
        finished = comp.finish_reason is not None
        if not comp.token_ids and finished == reported_finish:
            continue
        logprobs = None
        if comp.logprobs is not None:
            logprobs = [{tid: (lp.logprob, lp.rank) for tid, lp in step.items()}
                        for step in comp.logprobs]
        chunk.deltas.append(SeqDelta(comp.index, list(comp.token_ids), logprobs,
                                     comp.finish_reason, comp.stop_reason))
        sent[comp.index] = (count + len(comp.token_ids), finished)
    return chunk


def _node_id() -> str:
    import ray

    if not ray.is_initialized():  # outside Ray (tests drive the class directly)
        return "local"
    return ray.get_runtime_context().get_node_id()
