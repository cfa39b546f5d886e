"""`EngineClient`: `ClusterClient.generate` over an engine in this process.

A batch actor runs the very request path an HTTP ingress runs (`OpenAIHandler`: request
checks, chat template, stop strings, response bodies) with this in place of the cluster:
each request goes to the actor's own `AsyncEngine`, whose outputs become the same
`StreamChunk`s a worker would send.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from raysvc.cluster.messages import RequestFailed, StreamChunk
from raysvc.cluster.worker import chunk_since
from raysvc.engine.async_engine import RequestFailedError


class EngineClient:
    def __init__(self, engine) -> None:
        self.engine = engine  # raysvc.engine.async_engine.AsyncEngine (token ids only)
        self._pending: set = set()  # finish_sample calls in flight (kept from collection)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: dict[str, Any], n: int = 1, priority: int = 0,
                       tenant: str = "") -> AsyncIterator[StreamChunk]:
        """`tenant` has no meaning here: one job's rows share one engine, no router."""
        from raysvc.engine.sampling_params import SamplingParams

        stream = await self.engine.add_request(request_id, prompt_token_ids,
                                               SamplingParams(**params, output_kind="delta"),
                                               priority=priority)
        sent: dict[int, tuple[int, bool]] = {}
        try:
            async for out in stream:
                yield chunk_since(out, sent)
        except RequestFailedError as e:  # this row alone: the engine (and the job) go on
            raise RequestFailed(str(e)) from e
        finally:  # leaving early (stop string, error) aborts the request in the engine
            await stream.aclose()

    def finish_sample(self, request_id: str, index: int) -> None:
        """As `ClusterClient.finish_sample`: the sample's stop string was found by the
        caller; end it in the engine now."""
        import asyncio

        task = asyncio.ensure_future(self.engine.finish_sample(request_id, index))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
