"""`ClusterClient` failover of an n > 1 request that already produced output, without
Ray: a fake worker streams two samples and dies; each unfinished sample must continue
as its own n = 1 request (prompt + that sample's tokens, max_tokens reduced, seed + its
index) on the next worker, and the caller's stream ends once, with every sample whole."""

from __future__ import annotations

import asyncio

from conftest import RemoteMethod as _M
from conftest import fake_exchange, fake_submit_many, queue_channel
from ray.exceptions import ActorDiedError

from raysvc.cluster.client import ClusterClient
from raysvc.cluster.messages import SeqDelta, StreamChunk, Ticket


class Worker:
    """Streams per sample index i the tokens 100*(i+1) + position; dies after `die_after`
    chunks (its channel raises ActorDiedError) if set."""

    def __init__(self, name, die_after=None):
        self.name, self.die_after = name, die_after
        self.submitted: list[tuple[str, list[int], dict]] = []
        self.queues: dict[str, asyncio.Queue] = {}
        self.submit, self.abort = _M(self._submit), _M(self._abort)
        self.submit_many = _M(fake_submit_many(self._submit))
        self.open_channel = self

    def remote(self, channel_id):
        return queue_channel(self.queues.setdefault(channel_id, asyncio.Queue()))

    async def _submit(self, channel_id, request_id, prompt, params, priority=0):
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
        self.exchange = _M(fake_exchange(self._acquire, self._release))
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
        async def _submit(self, channel_id, request_id, prompt, params, priority=0):
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


def test_a_stop_string_found_by_the_caller_ends_that_sample_on_its_worker():
    """Generation finds sample 1's stop string in the ingress; the client ends that sample
    on the worker streaming it (its ticket), while sample 0 goes on to max_tokens."""
    from raysvc.engine.loading import load_tokenizer
    from raysvc.models.builtin import path as builtin_path
    from raysvc.serve.detokenizer import SampleText
    from raysvc.serve.generation import Generation

    tok = load_tokenizer(builtin_path("tiny"))
    stop_ids = tok.encode(" the end", add_special_tokens=False)
    filler = tok.encode(" and so on", add_special_tokens=False)

    class TwoSamples(Worker):
        def __init__(self, name):
            super().__init__(name)
            self.finished_samples: list[tuple[str, int]] = []
            self.finish_sample = _M(self._finish_sample)

        async def _finish_sample(self, request_id, index):
            self.finished_samples.append((request_id, index))

        async def _submit(self, channel_id, request_id, prompt, params, priority=0):
            self.submitted.append((request_id, list(prompt), dict(params)))
            queue = self.queues.setdefault(channel_id, asyncio.Queue())

            async def play():
                steps = max(len(stop_ids), 8)
                for step in range(steps):
                    await asyncio.sleep(0.005)
                    last = step == steps - 1
                    one = stop_ids[step] if step < len(stop_ids) else filler[0]
                    deltas = [SeqDelta(0, [filler[step % len(filler)]], None,
                                       "length" if last else None),
                              SeqDelta(1, [one], None, "length" if last else None)]
                    queue.put_nowait([(request_id, StreamChunk(len(prompt), deltas, last))])

            asyncio.ensure_future(play())

    worker = TwoSamples("w0")
    client = ClusterClient(Router([worker]))
    prompt = [5, 6, 7]
    samples = [[SampleText(tok, prompt, [" the end"]) for _ in range(2)]]
    gen = Generation(client, "cmpl-x", [prompt], {"n": 2, "max_tokens": 8}, samples)

    async def main():
        async for _ in gen.stream():
            pass
        await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert samples[0][1].finish_reason == "stop" and samples[0][1].stop_reason == " the end"
    assert samples[0][0].finish_reason == "length"
    assert worker.finished_samples == [("cmpl-x-0/0", 1)]


class _Silent(Worker):
    """Streams two chunks, then nothing more (its engine hangs in a step)."""

    async def _submit(self, channel_id, request_id, prompt, params, priority=0):
        self.submitted.append((request_id, list(prompt), dict(params)))
        queue = self.queues.setdefault(channel_id, asyncio.Queue())
        for step in range(2):
            queue.put_nowait([(request_id, StreamChunk(len(prompt), [
                SeqDelta(0, [100 + len(prompt) + step], None, None)], False))])


def _health_checks(router, dropped: bool) -> list[str]:
    """The router's worker_failed answers `dropped` (the worker failed its health check);
    the returned list records which workers the client asked about."""
    checked: list[str] = []

    async def worker_failed(worker_id):
        checked.append(worker_id)
        return dropped

    router.worker_failed = _M(worker_failed)
    return checked


def _collect(client, params):
    async def main():
        tokens = []
        async for chunk in client.generate("r", [1, 2, 3], params):
            for d in chunk.deltas:
                tokens += d.token_ids
        return tokens
    return asyncio.run(asyncio.wait_for(main(), 30))


def test_a_stream_whose_worker_is_stuck_fails_over():
    """No chunk for stall_check_s: the router checks the worker; it drops it (its engine
    is stuck), and the stream continues on the next worker from the tokens it has."""
    stuck, healthy = _Silent("w0"), Worker("w1")
    router = Router([stuck, healthy])
    checked = _health_checks(router, dropped=True)
    client = ClusterClient(router, stall_check_s=0.2)
    tokens = _collect(client, {"n": 1, "max_tokens": 6})
    assert checked and checked[0] == "w0"
    assert tokens == [103, 104, 105, 106, 107, 108]
    (rid, prompt, params), = healthy.submitted
    assert prompt == [1, 2, 3, 103, 104] and params["max_tokens"] == 4


def test_a_slow_but_healthy_worker_is_waited_for():
    """Silence alone is no failure: the router finds the worker healthy, the client keeps
    waiting, and the stream finishes where it started."""
    class Slow(Worker):
        async def _submit(self, channel_id, request_id, prompt, params, priority=0):
            async def later():
                await asyncio.sleep(0.6)  # queued in its engine: longer than two checks
                await Worker._submit(self, channel_id, request_id, prompt, params)

            asyncio.ensure_future(later())

    slow, other = Slow("w0"), Worker("w1")
    router = Router([slow, other])
    checks = _health_checks(router, dropped=False)
    tokens = _collect(ClusterClient(router, stall_check_s=0.2), {"n": 1, "max_tokens": 4})
    assert len(tokens) == 4 and checks and not other.submitted


def test_the_ingress_hashes_blocks_and_passes_priority_and_tenant():
    """What the router gets is the prompt's block hashes (as the workers' prefix caches
    name them: `hash_blocks` over all but the last token, salted), never its token ids;
    priority and tenant reach the router, priority the worker's engine too."""
    from raysvc.block_hash import hash_blocks

    seen: list = []
    submitted: list = []

    class Recording(Worker):
        async def _submit(self, channel_id, request_id, prompt, params, priority=0):
            submitted.append(priority)
            await super()._submit(channel_id, request_id, prompt, params)

    router = Router([Recording("w0")])
    acquire = router._acquire

    async def recording_acquire(ticket_id, num_tokens, n, req):
        seen.append(req)
        return await acquire(ticket_id, num_tokens, n)

    router.exchange = _M(fake_exchange(recording_acquire, router._release, block_size=4))
    client = ClusterClient(router)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks of 4 before the last token

    async def main():
        async for _ in client.generate("r", prompt, {"n": 1, "max_tokens": 2,
                                                     "cache_salt": "s"},
                                       priority=-2, tenant="team-a"):
            pass

    asyncio.run(asyncio.wait_for(main(), 30))
    req = seen[0]
    assert req.block_hashes == hash_blocks(prompt[:-1], 4, "s") and len(req.block_hashes) == 3
    assert (req.priority, req.tenant, req.num_prompt_tokens) == (-2, "team-a", 13)
    assert not hasattr(req, "prompt_token_ids")
    assert submitted == [-2]
