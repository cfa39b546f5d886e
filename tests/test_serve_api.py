"""The HTTP layer against a scripted cluster (no Ray, no engine): how cluster failures and
client disconnects surface. The FastAPI app runs under uvicorn on 127.0.0.1; the router
and worker are fakes with Ray's call shape (`handle.method.remote(...)` -> awaitable), so
the real ingress code (OpenAIHandler, Generation, ClusterClient) runs unchanged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import aiohttp
import pytest
from conftest import RemoteMethod as _M
from conftest import fake_exchange, fake_submit_many, queue_channel
from ray.exceptions import ActorDiedError

from raysvc.cluster.messages import NoWorkers, Overloaded, SeqDelta, StreamChunk, Ticket


class FakeWorker:
    """Each request streams `tokens` one chunk at a time, `delay` apart; `die_after`
    chunks into the stream the worker 'dies' (its channel raises ActorDiedError)."""

    def __init__(self, tokens=(5, 6, 7), delay=0.01, die_after=None):
        self.tokens, self.delay, self.die_after = list(tokens), delay, die_after
        self.aborted: list[str] = []
        self.channels: dict[str, asyncio.Queue] = {}
        self.submit = _M(self._submit)
        self.submit_many = _M(fake_submit_many(self._submit))
        self.abort = _M(self._abort)
        self.open_channel = self  # .remote(channel_id) -> async iterator of awaitables

    def remote(self, channel_id):
        return queue_channel(self.channels.setdefault(channel_id, asyncio.Queue()))

    async def _submit(self, channel_id, request_id, prompt, params, priority=0):
        queue = self.channels.setdefault(channel_id, asyncio.Queue())

        async def play():
            for i, token in enumerate(self.tokens):
                await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    return
                if self.die_after is not None and i == self.die_after:
                    queue.put_nowait(ActorDiedError())
                    return
                last = i == len(self.tokens) - 1
                delta = SeqDelta(0, [token], None, "length" if last else None)
                queue.put_nowait([(request_id, StreamChunk(len(prompt), [delta], last))])

        asyncio.ensure_future(play())

    async def _abort(self, request_id):
        self.aborted.append(request_id)


class FakeRouter:
    def __init__(self, workers, refuse=None):
        self.workers_list, self.refuse = list(workers), refuse
        self.released: list[str] = []
        self.failed: list[str] = []
        self.requests: list = []  # the AcquireRequests the ingress sent
        self.exchange = _M(fake_exchange(self._acquire, self._release))
        self.worker_failed = _M(self._failed)
        self.workers = _M(self._workers)
        self.stats = _M(self._stats)

    async def _acquire(self, ticket_id, num_tokens, n, request=None):
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse
        worker = self.workers_list[0] if len(self.workers_list) == 1 else \
            self.workers_list.pop(0)
        return Ticket(ticket_id, f"w{id(worker)}", worker)

    async def _release(self, ticket_id):
        self.released.append(ticket_id)

    async def _failed(self, worker_id):
        self.failed.append(worker_id)

    async def _workers(self):
        return {"w": None}

    async def _stats(self):
        return {"queue_len": 0, "workers": []}


@pytest.fixture(scope="module")
def tokenizer(make_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_checkpoint("llama")[0])


def serve_app(tokenizer, router, server_hook=None):
    """Run the app on a free port in a thread; returns (url, stop)."""
    import uvicorn

    from raysvc.cluster.client import ClusterClient
    from raysvc.serve.handler import OpenAIHandler
    from raysvc.serve.http_api import build_api
    from raysvc.serve.planner import ModelFacts

    server = OpenAIHandler(tokenizer, ModelFacts("m", 256, 512), ClusterClient(router),
                           disconnect_poll_s=0.05)
    if server_hook is not None:
        server_hook(server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(build_api(server), host="127.0.0.1", port=port, log_level="error")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)

    def stop():
        uv.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


def post(url, body, timeout=10.0):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status, (await r.read()).decode()

    return asyncio.run(main())


BODY = {"prompt": "The list type", "max_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("error,status,code", [
    (Overloaded("server overloaded: 1024 requests are waiting"), 429, "overloaded"),
    (NoWorkers("no live worker is left"), 503, "worker_unavailable"),
])
def test_router_refusals_become_statuses(tokenizer, error, status, code):
    url, stop = serve_app(tokenizer, FakeRouter([FakeWorker()], refuse=error))
    try:
        for stream in (False, True):
            got, text = post(url, {**BODY, "stream": stream})
            assert got == status, text
            err = json.loads(text)["error"]
            assert err["code"] == code and str(error) in err["message"]
    finally:
        stop()


def test_priority_and_user_reach_the_router(tokenizer):
    router = FakeRouter([FakeWorker()])
    url, stop = serve_app(tokenizer, router)
    try:
        # 35 token ids: two full blocks of 16 for the router to match on
        status, text = post(url, {**BODY, "prompt": list(range(5, 40)), "priority": -3,
                                  "user": "team-a"})
        assert status == 200, text
        status, text = post(url, {**BODY, "priority": "urgent"})
        assert status == 400 and "priority" in json.loads(text)["error"]["message"], text
    finally:
        stop()
    (req,) = router.requests
    assert (req.priority, req.tenant) == (-3, "team-a") and len(req.block_hashes) == 2


def test_worker_death_before_output_is_retried_elsewhere(tokenizer):
    dead, alive = FakeWorker(die_after=0), FakeWorker()
    router = FakeRouter([dead, alive])
    url, stop = serve_app(tokenizer, router)
    try:
        status, text = post(url, BODY)
        assert status == 200, text
        assert json.loads(text)["usage"]["completion_tokens"] == 3
        assert len(router.failed) == 1 and len(router.released) == 2
    finally:
        stop()


def test_worker_death_after_output_is_a_clear_error(tokenizer):
    router = FakeRouter([FakeWorker(die_after=1), FakeWorker(die_after=1)])
    url, stop = serve_app(tokenizer, router)
    try:
        status, text = post(url, BODY)
        assert status == 503 and "died" in json.loads(text)["error"]["message"]
        status, text = post(url, {**BODY, "stream": True})
        assert status == 200  # the stream had started: the error travels as an event
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert "died" in json.loads(events[-2][6:])["error"]["message"]
    finally:
        stop()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_on_worker_and_releases_ticket(tokenizer, stream):
    worker = FakeWorker(tokens=list(range(5, 105)), delay=0.02)  # ~2 s if left alone
    router = FakeRouter([worker])
    url, stop = serve_app(tokenizer, router)
    try:
        with pytest.raises(asyncio.TimeoutError):
            post(url, {**BODY, "max_tokens": 100, "stream": stream}, timeout=0.3)
        deadline = time.monotonic() + 5
        while not (worker.aborted and router.released) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(worker.aborted) == 1 and worker.aborted[0] == router.released[0]
    finally:
        stop()


def test_a_receive_cancelled_by_serve_is_a_disconnect(tokenizer):
    """Serve's replica reads a request's messages from its proxy by an actor call; on a
    hang-up the proxy may cancel that call, and Serve raises its TaskCancelledError from
    `receive()` once, then blocks. The stream must end as on a disconnect: the app returns
    without an exception (no traceback in Serve's log), the worker aborts, the ticket is
    released."""
    from ray.exceptions import TaskCancelledError

    from raysvc.cluster.client import ClusterClient
    from raysvc.serve.handler import OpenAIHandler
    from raysvc.serve.http_api import build_api
    from raysvc.serve.planner import ModelFacts

    worker = FakeWorker(tokens=list(range(5, 105)), delay=0.02)
    router = FakeRouter([worker])
    app = build_api(OpenAIHandler(tokenizer, ModelFacts("m", 256, 512), ClusterClient(router),
                                  disconnect_poll_s=0.05))
    body = json.dumps({**BODY, "max_tokens": 100, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    calls = 0
    sent: list[dict] = []

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if calls == 2:
            await asyncio.sleep(0.2)  # a few chunks out, then the client hangs up
            raise TaskCancelledError()
        await asyncio.Event().wait()  # Serve's proxy after an error: nothing ever again

    async def send(message):
        sent.append(message)

    async def main():
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
        deadline = time.monotonic() + 5
        while not (worker.aborted and router.released) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert 0 < len(chunks) < 100  # it streamed, and stopped early
    assert len(worker.aborted) == 1 and worker.aborted[0] == router.released[0]


def test_metrics_pages_merge_per_family():
    from raysvc.serve.metrics_page import merge

    a = ("# HELP ray_raysvc_x Requests.\n# TYPE ray_raysvc_x gauge\n"
         'ray_raysvc_x{WorkerId="1"} 3\n# HELP ray_other y\n# TYPE ray_other gauge\n'
         "ray_other 1\n")
    b = ('# HELP ray_raysvc_x Requests.\n# TYPE ray_raysvc_x gauge\nray_raysvc_x{WorkerId="2"} 4\n')
    assert merge([a, b, ""]).splitlines() == [
        "# HELP ray_raysvc_x Requests.", "# TYPE ray_raysvc_x gauge",
        'ray_raysvc_x{WorkerId="1"} 3', 'ray_raysvc_x{WorkerId="2"} 4']


def test_planning_a_request_does_not_stall_the_event_loop(tokenizer):
    """A request whose checks, chat template and tokenization take long (a huge prompt, a
    big schema) is planned off the replica's event loop: other routes answer meanwhile."""
    def slow_start(server):
        start = server.start

        def slow(body, chat, *args, **kwargs):
            time.sleep(1.5)  # a planning step that holds the GIL-free thread, not the loop
            return start(body, chat, *args, **kwargs)

        server.start = slow

    url, stop = serve_app(tokenizer, FakeRouter([FakeWorker()]), server_hook=slow_start)
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                slow = asyncio.ensure_future(s.post(url + "/v1/completions", json=BODY))
                await asyncio.sleep(0.2)
                t0 = time.monotonic()
                async with s.get(url + "/version") as r:
                    assert r.status == 200
                took = time.monotonic() - t0
                async with await slow as r:
                    assert r.status == 200, await r.text()
                return took

        took = asyncio.run(asyncio.wait_for(main(), 30))
        assert took < 0.5, f"/version waited {took:.2f}s behind a request's planning"
    finally:
        stop()


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "prompt_logprobs": 6}, "prompt_logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "x", "bad_words": ["a", "b", "c"]}, "bad_words"),
    ({"prompt": "x", "logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias"),
    ({"prompt": "x", "guided_regex": "a" * 200}, "guided_regex"),
])
def test_request_cost_limits_are_the_servers_knobs(tokenizer, body, param):
    """The limits come from ServeArgs (here set low): a request past one is a 400 naming
    its field, before anything reaches the cluster."""
    import json as _json

    from raysvc.cluster.client import ClusterClient
    from raysvc.serve.args import ServeArgs
    from raysvc.serve.errors import APIError
    from raysvc.serve.handler import OpenAIHandler
    from raysvc.serve.planner import ModelFacts

    limits = ServeArgs(max_logprobs=5, max_stop_strings=2, max_bad_words=2, max_logit_bias=2,
                       max_structured_output_bytes=128).request_limits()
    server = OpenAIHandler(tokenizer, ModelFacts("m", 256, 512, limits=limits),
                           ClusterClient(FakeRouter([FakeWorker()])))
    with pytest.raises(APIError) as e:
        server.start(_json.dumps(body).encode(), chat=False)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    server.start(_json.dumps({"prompt": "x", "logprobs": 5, "stop": ["a", "b"]}).encode(),
                 chat=False)  # at the limits: fine
