"""The draft-model actor pool: lossless through Ray, and a dying draft actor costs nothing."""

from __future__ import annotations

import os
import time

import pytest
import ray
from conftest import assert_no_leaks

from raysvc import LLM, SamplingParams
from raysvc.cluster.draft_pool import DraftPoolProposer, start_draft_pool
from raysvc.engine.config import EngineConfig
from raysvc.engine.llm_engine import LLMEngine

PROMPTS = ["The list type", "A dictionary is a", "def f(x):\n    return", "The while"]
SPEC = {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def run(engine: LLMEngine, params: SamplingParams, kill_after: int | None = None, actor=None):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == kill_after:
            ray.kill(actor, no_restart=False)
    return [outs[f"r{i}"] for i in range(len(PROMPTS))]


def test_pool_greedy_identical_and_survives_a_killed_actor(ray_cluster):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(dtype="float32").generate(PROMPTS, params)]
    actors = start_draft_pool(2, dtype="float32", num_cpus=1, num_threads=1)
    proposer = DraftPoolProposer(actors, timeout_s=30)
    engine = LLMEngine(EngineConfig(dtype="float32", speculative_config=SPEC), proposer)
    assert run(engine, params) == expected
    stats = engine.stats()
    assert stats["spec_accepted_tokens"] > 0
    assert not proposer.pinned  # finished sequences were released on their actors
    assert_no_leaks(engine)

    # kill one actor mid-run: its sequences decode plainly, then re-seed the restarted actor
    engine2 = LLMEngine(EngineConfig(dtype="float32", speculative_config=SPEC),
                        DraftPoolProposer(actors, timeout_s=30))
    assert run(engine2, params, kill_after=5, actor=actors[0]) == expected
    assert engine2.spec.proposer.failures >= 1
    assert engine2.stats()["spec_accepted_tokens"] > 0
    assert_no_leaks(engine2)
    # the restarted actor serves again (once its restart is done: on a loaded machine the
    # model load can outlast engine2's run)
    deadline = time.monotonic() + 180
    while True:
        try:
            assert ray.get(actors[0].ready.remote(), timeout=60)
            break
        except ray.exceptions.ActorUnavailableError:  # still restarting
            assert time.monotonic() < deadline, "the killed draft actor never came back"
            time.sleep(0.5)
    engine3 = LLMEngine(EngineConfig(dtype="float32", speculative_config=SPEC),
                        DraftPoolProposer([actors[0]], timeout_s=60))
    assert run(engine3, params) == expected
    assert engine3.spec.proposer.failures == 0
    assert engine3.stats()["spec_accepted_tokens"] > 0
