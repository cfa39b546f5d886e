"""`AsyncEngine`: the engine behind an asyncio API, as the Ray worker actor needs it.

The step loop runs in one background thread (the model's matmuls release the GIL, so
the event loop stays responsive), and every engine call — add, abort, step — goes
through that same single thread, so the engine itself needs no locks. Each request gets
an async iterator of its incremental outputs; leaving the iterator early (a client
disconnect) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from raysvc.engine.config import EngineConfig
from raysvc.engine.llm_engine import LLMEngine
from raysvc.engine.outputs import RequestOutput
from raysvc.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The step loop failed; in-flight requests cannot finish on this engine."""


class RequestFailedError(RuntimeError):
    """This request alone failed inside a step (`RequestOutput.error`); the engine serves
    on. Replaying it elsewhere would fail the same way."""


class RequestMigratedError(RuntimeError):
    """The request left this engine with its KV (`migrate_out`): it continues elsewhere.
    Its stream ends with this after every output the engine made for it here."""


_MIGRATED = object()  # a migrated request's stream: nothing more comes


class AsyncEngine:
    def __init__(self, model: str | None = None, proposer=None, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs), proposer)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raysvc-engine")
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="raysvc-grammar-compile")
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._has_work: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._step_started: float | None = None

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._has_work = asyncio.Event()
            self._loop_task = asyncio.create_task(self._run())

    async def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        resume_kv=None,
    ) -> AsyncIterator[RequestOutput]:
        """Enqueue a request; returns the async iterator of its outputs.

        Validation errors (ValueError naming the field) are raised here, before anything
        is queued. Each output is cumulative; the last one has `finished=True`.
        `resume_kv`: a migrated sequence's KV (`LLMEngine.add_request`).
        """
        if self._dead is not None:
            raise EngineDeadError("engine step loop failed") from self._dead
        self._ensure_loop()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if params is not None and params.structured_outputs is not None:
            await self._compile(params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            await self._call(self.engine.add_request, request_id, prompt, params, priority,
                             None, resume_kv)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._has_work.set()
        return self._stream(request_id, queue)

    async def _compile(self, params: SamplingParams) -> None:
        """Compile the request's grammar on the compile thread, bounded in time, so the
        step thread (every other request) never waits on it; add_request then finds it
        cached. A compilation past the bound goes on in the background (cached when done)
        and this request is refused."""
        timeout = self.engine.config.grammar_compile_timeout_s
        work = asyncio.get_running_loop().run_in_executor(self._compiler, self.engine._compile,
                                                          params)
        try:
            await asyncio.wait_for(asyncio.shield(work), timeout)
        except TimeoutError:
            kind = params.structured_outputs.kind
            raise ValueError(f"structured_outputs.{kind}: compiling it took longer than "
                             f"{timeout:g}s; simplify the constraint") from None

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """vLLM-style: `async for out in engine.generate(prompt, params)`."""
        async for out in await self.add_request(request_id, prompt, params):
            yield out

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if item is _MIGRATED:
                    finished = True  # gone from the engine already: nothing to abort
                    raise RequestMigratedError(f"request {request_id} left with its KV")
                if isinstance(item, BaseException):
                    raise EngineDeadError("engine step loop failed") from item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(f"request {request_id}: {item.error}")
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None:
                # The consumer left early (e.g. client disconnect): free the request's blocks.
                await asyncio.shield(self._call(self.engine.abort, request_id))

    async def abort(self, request_id: str) -> None:
        out = await self._call(self.engine.abort, request_id)
        queue = self._streams.get(request_id)
        if out is not None and queue is not None:
            out.finished = True
            queue.put_nowait(out)

    async def export_kv(self, block_hashes: list[bytes]):
        """`LLMEngine.export_kv` on the engine thread (between steps)."""
        return await self._call(self.engine.export_kv, block_hashes)

    async def import_kv(self, kv) -> int:
        return await self._call(self.engine.import_kv, kv)

    async def migrate_out(self, request_ids: list[str]) -> tuple[dict, list[str]]:
        """`LLMEngine.migrate_out` between steps; each moved request's stream then ends
        with `RequestMigratedError`, after the outputs of every step it ran here (those
        were queued before this call's result arrives: one engine thread, in order)."""
        moved, nothing = await self._call(self.engine.migrate_out, request_ids)
        for request_id in moved:
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(_MIGRATED)
        return moved, nothing

    async def add_lora(self, lora_request) -> None:
        """`LLMEngine.add_lora` on the engine thread (between steps)."""
        await self._call(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_name: str) -> None:
        await self._call(self.engine.remove_lora, lora_name)

    async def finish_sample(self, request_id: str, index: int, reason: str = "stop",
                            stop_reason: int | str | None = None) -> None:
        """End one sample of an n > 1 request; its stream gets the update (and closes when
        that was the last running sample)."""
        out = await self._call(self.engine.finish_sample, request_id, index, reason,
                               stop_reason)
        queue = self._streams.get(request_id)
        if out is not None and queue is not None:
            queue.put_nowait(out)

    async def stats(self) -> dict[str, int]:
        """Counters read now, without waiting behind a running step (a load report must
        not stall on a long step). The engine thread may be mid-step: each value is a
        plain read, so a snapshot can straddle a step boundary, never a torn value."""
        return self.engine.stats()

    async def not_started(self, limit: int) -> list[str]:
        """`LLMEngine.not_started`, read on the engine thread (between steps)."""
        return await self._call(self.engine.not_started, limit)

    async def cached_block_hashes(self) -> set[bytes]:
        """The prefix cache's block hashes, read on the engine thread (between steps)."""
        return await self._call(self.engine.cached_block_hashes)

    @property
    def step_running_s(self) -> float:
        """How long the step now running has run (0 between steps): a step that never
        ends (a hung device, a deadlock) shows here while the thread cannot say so."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def failure(self) -> BaseException | None:
        """The exception that stopped the step loop, or None while the engine is healthy."""
        return self._dead

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished_requests():
                self._has_work.clear()
                await self._has_work.wait()
                continue
            self._step_started = time.monotonic()
            try:
                outputs = await self._call(self.engine.step)
            except Exception as e:  # a failed step leaves the engine's state unknown
                self._dead = e
                for queue in self._streams.values():
                    queue.put_nowait(e)
                raise
            finally:
                self._step_started = None
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._compiler.shutdown(wait=False, cancel_futures=True)
