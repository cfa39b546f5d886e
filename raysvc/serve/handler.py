"""`OpenAIHandler`: what one ingress replica does per request, free of HTTP plumbing.

parse (strict pydantic) -> check against the model -> tokenize / chat template -> plan ->
generate through the cluster -> shape OpenAI's response or its server-sent events. Errors
from the cluster become HTTP statuses here: `Overloaded` 429, no worker 503, a worker
that died mid-request 503, a request the engine refused 400.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from raysvc.cluster.messages import (
    NoWorkers,
    Overloaded,
    RequestFailed,
    RouterUnavailable,
    ShuttingDown,
    WorkerDied,
)
from raysvc.cluster.metrics import RequestMetrics
from raysvc.serve import planner
from raysvc.serve import response_builders as build
from raysvc.serve.errors import APIError, bad_request, from_validation_error
from raysvc.serve.generation import Generation
from raysvc.serve.planner import ModelFacts
from raysvc.serve.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    NamedToolChoice,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Started:
    """A request that passed every check and has a generation ready to run."""

    request_id: str
    chat: bool
    stream: bool
    include_usage: bool
    gen: Generation
    plan: planner.Plan
    cursor: build.LogprobCursor
    created: int = field(default_factory=lambda: int(time.time()))
    iterator: AsyncIterator[list[int]] | None = None
    first: list[int] | None = None
    tool_parser: str | None = None  # how to read tool calls out of the answers (tool_parsers)
    continuous_usage: bool = False  # usage in every chunk (vLLM's continuous_usage_stats)


class OpenAIHandler:
    """`client` runs generations: a `ClusterClient` (serving: router + workers), or an
    engine in this process (`raysvc.batch`) — any object with ClusterClient's `generate`.
    The health and stats routes need a ClusterClient."""

    def __init__(self, tokenizer, facts: ModelFacts, client: Any, api_key: str | None = None,
                 max_body_bytes: int = 4 << 20, disconnect_poll_s: float = 0.25) -> None:
        self.tokenizer = tokenizer
        self.facts = facts
        self.client = client
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.disconnect_poll_s = disconnect_poll_s
        self.metrics = RequestMetrics(facts.name)
        self.lora_admin = None  # a LoRAAdmin where adapters may change while serving
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}{uuid.uuid4().hex[:6]}"

    # -- requests ----------------------------------------------------------------------

    def start(self, body: bytes, chat: bool, id_suffix: str | None = None,
              created: int | None = None) -> Started:
        """Check a request and plan its generation. `id_suffix` and `created` fix the
        response's id and timestamp (a batch rerun must write the same bytes)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad_request(f"request body is not valid UTF-8 (byte {e.start})",
                              code="invalid_encoding") from e
        model = planner.ChatCompletionRequest if chat else planner.CompletionRequest
        try:
            req: ChatCompletionRequest | CompletionRequest = model.model_validate_json(text)
        except ValidationError as e:
            raise from_validation_error(e) from e
        planner.check_model(req.model, self.facts)
        if chat:
            prompts = [planner.chat_prompt(req, self.tokenizer, self.facts)]
            top_n = (req.top_logprobs or 0) if req.logprobs else None
        else:
            prompts = planner.completion_prompts(req, self.tokenizer, self.facts)
            top_n = req.logprobs
        parse_tools = chat and bool(req.tools) and req.tool_choice in (None, "auto")
        plan = planner.plan(req, prompts, self.tokenizer, self.facts,
                            keep_special_tokens=parse_tools)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{id_suffix or self._new_suffix()}"
        # A fixed response id (a batch row's) may repeat across identical rows in flight at
        # once; the engine's ids must not.
        engine_id = request_id if id_suffix is None else f"{request_id}-{self._new_suffix()}"
        gen = Generation(self.client, engine_id, plan.prompts, plan.engine_params,
                         plan.samples)
        gen.score_only = plan.score_only
        gen.priority, gen.tenant = plan.priority, plan.tenant
        options = req.stream_options
        s = Started(request_id, chat, req.stream, bool(options and options.include_usage), gen,
                    plan, build.LogprobCursor(self.tokenizer, top_n),
                    continuous_usage=bool(options and options.continuous_usage_stats))
        if parse_tools:
            s.tool_parser = self.facts.tool_parser
        elif chat and req.tool_choice == "required":
            s.tool_parser = "required"
        elif chat and isinstance(req.tool_choice, NamedToolChoice):
            s.tool_parser = "named:" + req.tool_choice.function.name
        if created is not None:
            s.created = created
        return s

    def _new_suffix(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    async def collect(self, s: Started) -> BaseModel:
        """Run a non-streaming request to the end and shape its response."""
        iterator = s.gen.stream()
        try:
            async for _ in iterator:
                pass
        except Exception as e:
            raise cluster_error(e) from e
        finally:
            await iterator.aclose()
            self._record(s)
        name = self.facts.name
        if s.chat:
            return build.chat_response(s.request_id, name, s.gen, s.cursor, s.created,
                                       s.tool_parser)
        return build.completion_response(s.request_id, name, s.gen, s.plan, s.cursor,
                                         s.created)

    async def open_stream(self, s: Started) -> None:
        """Wait for the first output before answering, so queue-full (429) and similar
        refusals still reach the client as HTTP statuses."""
        s.iterator = s.gen.stream()
        try:
            s.first = await anext(s.iterator, None)
        except Exception as e:
            await s.iterator.aclose()
            raise cluster_error(e) from e

    async def sse(self, s: Started) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them; the last is `data: [DONE]`."""
        name, echoed = self.facts.name, set()
        streams = None
        if s.tool_parser is not None:
            from raysvc.serve.tool_parsers import ToolStream

            streams = {i: ToolStream(s.tool_parser) for i in range(len(s.gen.choices))}
        try:
            if s.chat:
                role = build.chat_role_chunk(s.request_id, name, s.created,
                                                 len(s.gen.choices))
                yield _event(role, s.include_usage)
            moved = s.first
            while moved is not None:
                if s.chat:
                    chunk = build.chat_chunk(s.request_id, name, s.created, s.gen, moved,
                                             s.cursor, streams)
                else:
                    chunk = build.completion_chunk(s.request_id, name, s.created, s.gen,
                                                   moved, s.plan, s.cursor, echoed)
                if chunk is not None:
                    if s.continuous_usage:
                        chunk.usage = build.usage(s.gen)
                    yield _event(chunk, s.include_usage or s.continuous_usage)
                moved = await anext(s.iterator, None)
            if s.include_usage:
                kind = build.ChatCompletionChunk if s.chat else build.CompletionResponse
                yield _event(kind(id=s.request_id, model=name, created=s.created, choices=[],
                                  usage=build.usage(s.gen)), True)
        except Exception as e:  # after the status line: the error travels as an event
            err = cluster_error(e)
            yield f"data: {_json(err.body())}\n\n"
        finally:
            await s.iterator.aclose()
            self._record(s)
        yield "data: [DONE]\n\n"

    def _record(self, s: Started) -> None:
        t = s.gen.timing
        if t.first_token is not None:
            self.metrics.first_token(t.first_token - t.start)
        for seconds, tokens in t.gaps:
            self.metrics.inter_token(seconds, tokens)
        self.metrics.request_done(time.monotonic() - t.start, s.gen.num_prompt_tokens,
                                  s.gen.num_output_tokens,
                                  [c.finish_reason or "abort" for c in s.gen.choices])

    # -- other routes ------------------------------------------------------------------

    def tokenize(self, body: bytes) -> dict:
        """vLLM's /tokenize: the ids a prompt (or a chat) becomes, as generation sees them."""
        from raysvc.serve.schema import (
            ChatCompletionRequest,
            TokenizeRequest,
            TokenizeResponse,
        )

        req = self.parse(TokenizeRequest, body)
        planner.check_model(req.model, self.facts)
        if req.messages is not None:
            try:
                chat = ChatCompletionRequest(
                    messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=req.continue_final_message,
                    chat_template=req.chat_template,
                    chat_template_kwargs=req.chat_template_kwargs, tools=req.tools)
            except ValidationError as e:
                raise from_validation_error(e) from e
            ids = planner.chat_prompt(chat, self.tokenizer, self.facts)
            if req.add_special_tokens:
                ids = self.tokenizer.build_inputs_with_special_tokens(ids)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens
                                        is not False)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.facts.max_model_len,
                                tokens=ids, token_strs=strs).model_dump()

    def detokenize(self, body: bytes) -> dict:
        from raysvc.serve.schema import DetokenizeRequest, DetokenizeResponse

        req = self.parse(DetokenizeRequest, body)
        planner.check_model(req.model, self.facts)
        bad = [t for t in req.tokens if not 0 <= t < self.facts.vocab_size]
        if bad:
            raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary "
                              f"[0, {self.facts.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)).model_dump()

    def parse(self, model, body: bytes):
        try:
            return model.model_validate_json(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise bad_request(f"request body is not valid UTF-8 (byte {e.start})",
                              code="invalid_encoding") from e
        except ValidationError as e:
            raise from_validation_error(e) from e

    def models(self) -> ModelList:
        f = self.facts
        return ModelList(data=[ModelCard(id=f.name, root=f.name, max_model_len=f.max_model_len),
                               *(ModelCard(id=name, root=path, parent=f.name,
                                           max_model_len=f.max_model_len)
                                 for name, path in sorted(f.loras.items()))])

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Up while at least one worker is ready (starting or draining ones do not count)."""
        try:
            workers = await asyncio.wait_for(self.client.router.health.remote(), 10)
        except Exception as e:
            return False, {"detail": f"router unreachable: {type(e).__name__}"}
        return workers["ready"] > 0, {"workers": workers["ready"], **workers}

    async def cluster_stats(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.client.router.stats.remote(), 30)
        except Exception as e:
            raise cluster_error(e) from e


def cluster_error(e: BaseException) -> APIError:
    """Map what a generation raised to the HTTP error the client should see. Whatever is
    the service's own trouble (overload, a worker or the router restarting, shutting down)
    is a 429 or 503 with Retry-After, never a 500: clients and load balancers retry those."""
    from ray.exceptions import RayActorError

    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        return APIError(429, _last_line(e), type="overloaded_error", code="overloaded",
                        retry_after=1)
    if isinstance(e, (NoWorkers, WorkerDied)):
        return APIError(503, _last_line(e), type="service_unavailable_error",
                        code="worker_unavailable", retry_after=5)
    if isinstance(e, (RouterUnavailable, ShuttingDown, RayActorError, TimeoutError,
                      asyncio.TimeoutError)):
        return APIError(503, _last_line(e), type="service_unavailable_error",
                        code="service_unavailable", retry_after=2)
    if isinstance(e, ValueError):
        return bad_request(_last_line(e))
    if isinstance(e, RequestFailed):  # not the service's trouble, and a retry fails alike
        return APIError(500, f"the request failed in the engine: {_last_line(e)}",
                        type="internal_error", code="request_failed")
    logger.error("generation failed: %r", e)
    return APIError(500, f"internal error: {type(e).__name__}: {_last_line(e)}",
                    type="internal_error")


def _last_line(e: BaseException) -> str:
    """The message of `e`, or of its cause when Ray wrapped it (RayTaskError)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def _event(chunk: BaseModel, with_usage: bool) -> str:
    """One SSE event; chunks carry `"usage": null` only when usage was asked for (OpenAI)."""
    return f"data: {chunk.model_dump_json(exclude=None if with_usage else {'usage'})}\n\n"
