"""`ClusterClient` failover of an n > 1 request that already produced output, without
Ray: a fake worker streams two samples and dies; each unfinished sample must continue
as its own n = 1 request (prompt + that sample's tokens, max_tokens reduced, seed + its
index) on the next worker, and the caller's stream ends once, with every sample whole."""

from __future__ import annotations

import asyncio

from conftest import queue_channel
from ray.exceptions import ActorDiedError

from raysvc.cluster.client import ClusterClient
from raysvc.cluster.messages import SeqDelta, StreamChunk, Ticket


class _M:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


class Worker:
    """Streams per sample index i the tokens 100*(i+1) + position; dies after `die_after`
    chunks (its channel raises ActorDiedError) if set."""

    def __init__(self, name, die_after=None):
        self.name, self.die_after = name, die_after
        self.submitted: list[tuple[str, list[int], dict]] = []
        self.queues: dict[str, asyncio.Queue] = {}
        self.submit, self.abort = _M(self._submit), _M(self._abort)
        self.open_channel = self

    def remote(self, channel_id):
        return queue_channel(self.queues.setdefault(channel_id, asyncio.Queue()))

    async def _submit(self, channel_id, request_id, prompt, params):
        self.submitted.append((request_id, list(prompt), dict(params)))
        queue = self.queues.setdefault(channel_id, asyncio.Queue())
        n, total = params["n"], params["max_tokens"]

        async def play():
            for step in range(total):
                await asyncio.sleep(0.005)
                if self.die_after is not None and step == self.die_after:
                    queue.put_nowait(ActorDiedError())
                    return
                last = step == total - 1
                deltas = [SeqDelta(i, [100 * (i + 1) + len(prompt) + step], None,
                                   "length" if last else None) for i in range(n)]
                queue.put_nowait([(request_id, StreamChunk(len(prompt), deltas, last))])

        asyncio.ensure_future(play())

    async def _abort(self, request_id):
        pass


class Router:
    def __init__(self, workers):
        self.workers = list(workers)
        self.acquire, self.release = _M(self._acquire), _M(self._release)
        self.worker_failed = _M(self._failed)

    async def _acquire(self, ticket_id, num_tokens, n, *_):
        worker = self.workers[0] if len(self.workers) == 1 else self.workers.pop(0)
        return Ticket(ticket_id, worker.name, worker)

    async def _release(self, ticket_id):
        pass

    async def _failed(self, worker_id):
        pass


def test_n_samples_continue_one_by_one_after_their_worker_died():
    first, second = Worker("w0", die_after=3), Worker("w1")
    client = ClusterClient(Router([first, second]))
    prompt, params = [1, 2, 3], {"n": 2, "max_tokens": 8, "seed": 10, "temperature": 0.8}

    async def main():
        tokens: dict[int, list[int]] = {0: [], 1: []}
        ends = 0
        async for chunk in client.generate("r", prompt, params, n=2):
            assert chunk.num_prompt_tokens == len(prompt)
            ends += chunk.finished
            for d in chunk.deltas:
                tokens[d.index] += d.token_ids
        return tokens, ends

    tokens, ends = asyncio.run(asyncio.wait_for(main(), 30))
    assert ends == 1  # the request ended once, after both samples
    assert {i: len(t) for i, t in tokens.items()} == {0: 8, 1: 8}
    # the continuations: one n = 1 request per sample, from that sample's own tokens
    conts = sorted(second.submitted)
    assert [p["n"] for _, _, p in conts] == [1, 1]
    for (rid, sent_prompt, p), index in zip(conts, (0, 1), strict=True):
        assert rid.startswith(f"r.s{index}/")
        assert sent_prompt == prompt + tokens[index][:3]  # 3 chunks arrived before the death
        assert p["max_tokens"] == 5 and p["seed"] == 10 + index
        assert p["continued_output_tokens"] == 3
        assert tokens[index][3:] == [100 * 1 + len(sent_prompt) + s for s in range(5)]


def test_a_request_that_failed_on_its_own_is_not_replayed():
    """A worker's chunk saying this request alone failed (its engine serves on) ends the
    request with RequestFailed after one attempt: another worker would fail the same way."""
    from raysvc.cluster.messages import RequestFailed

    class Failing(Worker):
        async def _submit(self, channel_id, request_id, prompt, params):
            self.submitted.append((request_id, list(prompt), dict(params)))
            queue = self.queues.setdefault(channel_id, asyncio.Queue())
            queue.put_nowait([(request_id, StreamChunk(0, [], True,
                                                       request_error="IndexError: boom"))])

    first, second = Failing("w0"), Worker("w1")
    client = ClusterClient(Router([first, second]))

    async def main():
        async for _ in client.generate("r", [1, 2], {"n": 1, "max_tokens": 4}):
            pass

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
        raise AssertionError("RequestFailed not raised")
    except RequestFailed as e:
        assert "IndexError: boom" in str(e)
    assert len(first.submitted) == 1 and not second.submitted
