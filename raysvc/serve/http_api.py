"""The OpenAI-compatible HTTP API as a FastAPI app over one `OpenAIHandler`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET|POST /ping, POST /tokenize, POST /detokenize, GET /version, GET /metrics
(Prometheus), GET /cluster/stats. CORS as vLLM's (`allowed_origins`, default any). Every
error leaves in OpenAI's error shape. Built per replica (Serve's late-bound ingress), so
the routes close over their server instead of a global.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raysvc.serve.errors import APIError
from raysvc.serve.handler import OpenAIHandler

logger = logging.getLogger(__name__)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
    return bytes(body)


class CancelledReceiveIsDisconnect:
    """ASGI middleware: a receive that Ray cancelled reads as the client's disconnect.

    Serve's replica fetches a request's ASGI messages from its proxy with an actor call.
    When the client hangs up, the proxy may cancel that call before it sends
    `http.disconnect`; Serve then raises the TaskCancelledError from `receive()` once and
    blocks on every later call. A stream's disconnect listener would let it escape as a
    traceback in the logs. A cancelled receive means the request is gone, so it is
    answered — now and on every later call — with the disconnect it stands for.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from ray.exceptions import TaskCancelledError

        gone = False

        async def receive_or_disconnect():
            nonlocal gone
            if not gone:
                try:
                    return await receive()
                except TaskCancelledError:
                    gone = True
            return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


def build_api(server: OpenAIHandler, allowed_origins: list[str] | None = None, *,
              metrics_public: bool = False, enable_docs: bool = False) -> FastAPI:
    """The routes. /metrics needs the API key (when one is set) unless `metrics_public`;
    FastAPI's /docs and /openapi.json exist only with `enable_docs`."""
    from fastapi.middleware.cors import CORSMiddleware

    app = FastAPI(title="raysvc", description="OpenAI-compatible LLM serving on Ray Serve",
                  docs_url="/docs" if enable_docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if enable_docs else None)
    app.add_middleware(CancelledReceiveIsDisconnect)
    # CORS as vLLM's defaults: any origin, method and header, no credentials
    app.add_middleware(CORSMiddleware, allow_origins=allowed_origins or ["*"],
                       allow_methods=["*"], allow_headers=["*"], allow_credentials=False)

    def authorize(request: Request) -> None:
        key = server.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return APIError(400, str(e.errors()[:1])).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> Response:
        from ray.exceptions import TaskCancelledError

        if isinstance(e, TaskCancelledError):  # Serve cancelled it: the client hung up
            return Response(status_code=499)
        logger.exception("internal error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}",
                        type="internal_error").response()

    async def generate(request: Request, chat: bool) -> Response:
        authorize(request)
        body = await read_body(request, server.max_body_bytes)
        if server.lora_admin is not None:  # adapters loaded elsewhere meanwhile
            await server.lora_admin.refresh()
        # parsing, chat template, tokenization and grammar checks cost with the request:
        # off this event loop, which every other stream of this replica shares
        result = await asyncio.to_thread(server.start, body, chat)
        if result.stream:
            await server.open_stream(result)
            return StreamingResponse(server.sse(result), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        work = asyncio.ensure_future(server.collect(result))
        try:
            while True:  # the client may leave while we wait: then abort the request
                done, _ = await asyncio.wait({work}, timeout=server.disconnect_poll_s)
                if done:
                    return Response(work.result().model_dump_json(),
                                    media_type="application/json")
                if await request.is_disconnected():
                    logger.info("client left; aborting %s", result.request_id)
                    return Response(status_code=499)
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        if server.lora_admin is not None:
            await server.lora_admin.refresh()
        return JSONResponse(server.models().model_dump())

    if server.lora_admin is not None:  # vLLM's runtime adapter routes, when allowed
        from raysvc.serve.schema import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

        def lora_route(schema, act):
            async def route(request: Request) -> Response:
                authorize(request)
                body = await read_body(request, server.max_body_bytes)
                return PlainTextResponse(await act(server.parse(schema, body)))
            return route

        app.post("/v1/load_lora_adapter")(
            lora_route(LoadLoRAAdapterRequest, server.lora_admin.load))
        app.post("/v1/unload_lora_adapter")(
            lora_route(UnloadLoRAAdapterRequest, server.lora_admin.unload))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, detail = await server.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", **detail},
                            status_code=200 if ok else 503)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_body(request, server.max_body_bytes)
        return JSONResponse(server.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_body(request, server.max_body_bytes)
        return JSONResponse(server.detokenize(body))

    @app.get("/version")
    async def version() -> JSONResponse:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            return JSONResponse({"version": dist_version("raysvc")})
        except PackageNotFoundError:  # run from a source tree, not installed
            return JSONResponse({"version": "unknown"})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """SageMaker-style liveness (vLLM serves it): 200 while a worker is ready."""
        ok, _ = await server.health()
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """raysvc's Prometheus metrics from every node's Ray metrics agent; behind the API
        key like every route unless `metrics_public` (a scraper without the key)."""
        from raysvc.serve.metrics_page import metrics_text

        if not metrics_public:
            authorize(request)
        return Response(await metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/cluster/stats")
    async def cluster_stats(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(await server.cluster_stats())

    return app
