"""A bare Ray Serve app that answers /v1/completions at once: the ceiling of Serve's proxy.

`raysvc bench serve --mode requests` runs it beside raysvc, on the same Ray and Serve,
with the ingress's replica count and options: whatever requests/s it reaches is what
Serve's HTTP proxy and a Python replica cost on this machine; raysvc's requests/s as a
share of it is what the rest of the path (validation, tokenizer, router, worker, the
stream back) costs. It parses the body (any server must) and streams one OpenAI-shaped
chunk, the usage, and [DONE], as raysvc does for max_tokens 1.
"""

from __future__ import annotations

import json
from typing import Any

ROUTE_PREFIX = "/echo"


class Echo:
    async def __call__(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        body = await request.json()
        chunk = {"id": "cmpl-echo", "object": "text_completion", "model": body.get("model"),
                 "choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}
        usage = {"id": "cmpl-echo", "object": "text_completion", "choices": [],
                 "usage": {"prompt_tokens": len(body.get("prompt") or ()),
                           "completion_tokens": 1}}

        async def events():
            yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def deploy(num_replicas: int, num_cpus: float, max_ongoing_requests: int) -> str:
    """Run the echo app on the connected Serve; returns its route prefix (the base URL's
    path)."""
    from ray import serve

    app = serve.deployment(Echo, name="Echo", num_replicas=num_replicas,
                           ray_actor_options={"num_cpus": num_cpus},
                           max_ongoing_requests=max_ongoing_requests).bind()
    serve.run(app, name="echo", route_prefix=ROUTE_PREFIX, blocking=False,
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    return ROUTE_PREFIX
