"""`raysvc serve --draft-workers N` below HTTP: the Serve app's cluster deployment
(`RaysvcCluster`, run here as a plain object on a local Ray) starts a draft-model actor
pool and hands it to its workers (two workers sharing one draft actor here). Greedy
output through the router equals the offline engine without speculation; the spec
counters reach /cluster/stats and Prometheus; a killed draft actor costs no request and
changes no output, and serves again once Ray has restarted it.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from conftest import fresh_ray

SPEC = {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}
ENGINE = {"dtype": "float32", "num_kv_blocks": 192, "max_num_seqs": 8,
          "speculative_config": SPEC}
PROMPTS = ["The list type", "A dictionary is a", "def f(x):\n    return", "The while",
           "Exceptions are", "Strings are"]


def _prompt_ids() -> list[list[int]]:
    from raysvc.engine.loading import load_tokenizer
    from raysvc.models.builtin import path

    tok = load_tokenizer(path("tiny"))
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def cluster():
    from raysvc.serve.app import RaysvcCluster
    from raysvc.serve.args import ServeArgs

    ray = fresh_ray()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        args = ServeArgs(num_workers=2, draft_workers=1, engine=ENGINE,
                         worker_num_cpus=1, worker_torch_threads=1, draft_torch_threads=1)
        c = RaysvcCluster(args.model_dump())
        ray.get(c.router.refresh.remote(), timeout=60)
        yield ray, c
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def expected():
    from raysvc import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = LLM(dtype="float32").generate(_prompt_ids(), params)
    return [o.outputs[0].token_ids for o in outs]


def _generate(router, on_token=None) -> list:
    from raysvc.cluster import ClusterClient

    params = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}

    async def main():
        client = ClusterClient(router)

        async def one(i: int, prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            async for chunk in client.generate(f"r{i}-{time.monotonic_ns()}", prompt, params):
                for delta in chunk.deltas:
                    tokens += delta.token_ids
                if on_token is not None:
                    on_token(len(tokens))
            return tokens

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompt_ids())))

    return asyncio.run(asyncio.wait_for(main(), 240))


def _worker_rows(ray, c) -> list[dict]:
    ray.get(c.router.refresh.remote(), timeout=60)
    return ray.get(c.router.stats.remote(), timeout=60)["workers"]


def _accepted(rows: list[dict]) -> int:
    return sum(r["spec_accepted_tokens"] for r in rows)


def test_greedy_through_the_draft_pool_equals_plain_decoding(cluster, expected):
    ray, c = cluster
    assert len(c.draft_actors) == 1 and len(ray.get(c.router.workers.remote(), timeout=30)) == 2
    assert _generate(c.router) == expected
    rows = _worker_rows(ray, c)
    # both workers drafted through the one shared actor (their sequences kept apart)
    for row in rows:
        assert row["requests_routed"] > 0, rows
        assert row["spec_draft_tokens"] > 0 and row["spec_accepted_tokens"] > 0, row
        assert 0 < row["spec_acceptance_rate"] <= 1
        assert row["kv_blocks_free"] == row["kv_blocks_total"]


def test_spec_metrics_are_exported(cluster):
    ray, _ = cluster
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n["Alive"]]
    names = ("raysvc_spec_decode_num_drafts", "raysvc_spec_decode_num_draft_tokens",
             "raysvc_spec_decode_num_accepted_tokens",
             "raysvc_spec_decode_num_accepted_tokens_per_pos")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = "".join(urllib.request.urlopen(u, timeout=10).read().decode() for u in urls)
        if all(n in text for n in names):
            break
        time.sleep(1)
    assert all(n in text for n in names), [n for n in names if n not in text]
    assert 'position="0"' in text


def test_killed_draft_actor_loses_nothing_and_comes_back(cluster, expected):
    ray, c = cluster
    (actor,) = c.draft_actors
    killed = []

    def on_token(n: int) -> None:
        if n >= 8 and not killed:
            killed.append(n)
            ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1)

    assert _generate(c.router, on_token) == expected
    assert killed
    _wait_restarted(ray, actor)
    before = _accepted(_worker_rows(ray, c))
    deadline = time.monotonic() + 120
    while True:  # the workers retry the actor after their back-off, then draft there again
        assert _generate(c.router) == expected
        rows = _worker_rows(ray, c)
        if _accepted(rows) > before:
            break
        assert time.monotonic() < deadline, rows
    assert all(r["kv_blocks_free"] == r["kv_blocks_total"] for r in rows)


def _wait_restarted(ray, actor, timeout_s: float = 120.0) -> None:
    """Until the restarted actor answers (a call during its restart is refused, not queued)."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=timeout_s)
            return
        except ActorUnavailableError:
            assert time.monotonic() < deadline, "the draft actor did not come back"
            time.sleep(0.5)


def test_spec_counters_grow_by_each_reports_increase():
    """Load reports carry cumulative counts; Prometheus counters get the differences,
    and a restarted worker (counts back to small numbers) is not read as negative."""
    from raysvc.cluster.messages import WorkerLoad
    from raysvc.cluster.metrics import ClusterMetrics

    class Recorder:
        def __init__(self):
            self.calls = []

        def inc(self, value, tags):
            self.calls.append((value, tags.get("position")))

        def set(self, value, tags):
            pass

    m = ClusterMetrics()
    for name in ("running", "waiting", "kv_usage", "preemptions", "spec_drafts",
                 "spec_draft_tokens", "spec_accepted", "spec_accepted_per_pos"):
        setattr(m, name, Recorder())
    first = WorkerLoad(spec_num_drafts=10, spec_draft_tokens=40, spec_accepted_tokens=25,
                       spec_accepted_tokens_per_position=[9, 7, 5, 4])
    second = WorkerLoad(spec_num_drafts=12, spec_draft_tokens=48, spec_accepted_tokens=25,
                        spec_accepted_tokens_per_position=[10, 7, 5, 4])
    restarted = WorkerLoad(spec_num_drafts=3, spec_draft_tokens=12, spec_accepted_tokens=6,
                           spec_accepted_tokens_per_position=[3, 2, 1, 0])
    m.worker("w", first)
    m.worker("w", second, previous=first)
    m.worker("w", restarted, previous=second)
    assert m.spec_drafts.calls == [(10, None), (2, None), (3, None)]
    assert m.spec_draft_tokens.calls == [(40, None), (8, None), (12, None)]
    assert m.spec_accepted.calls == [(25, None), (6, None)]  # no increase: nothing recorded
    assert m.spec_accepted_per_pos.calls == [(9, "0"), (7, "1"), (5, "2"), (4, "3"), (1, "0"),
                                             (3, "0"), (2, "1"), (1, "2")]
