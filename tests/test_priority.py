"""vLLM's `priority` in the engine: the waiting queue serves lower values first (FCFS
within one), preemption takes the newest sequence of the lowest priority, outputs are
unchanged (HF reference); `not_started` lists what a worker may give away. And at the
HTTP schema: `priority` and `user` are accepted, bad values refused naming the field."""

from __future__ import annotations

import pytest
from conftest import assert_no_leaks, hf_greedy

from raysvc import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("llama")


def _finish_order(engine) -> list[str]:
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_waiting_queue_serves_lower_priority_values_first(ckpt):
    path, hf = ckpt
    engine = LLM(path, max_num_seqs=1).engine
    prompt = [5, 6, 7, 8, 9]
    for request_id, priority in (("low", 5), ("normal-a", 0), ("urgent", -3),
                                 ("normal-b", 0)):
        engine.add_request(request_id, prompt, GREEDY, priority=priority)
    assert engine.not_started(10) == ["low", "normal-b", "normal-a", "urgent"]  # newest last
    assert _finish_order(engine) == ["urgent", "normal-a", "normal-b", "low"]
    assert_no_leaks(engine)
    expected = hf_greedy(hf, prompt, 6)
    engine.add_request("check", prompt, GREEDY, priority=7)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].outputs[0].token_ids == expected


def test_not_started_lists_waiting_requests_newest_first(ckpt):
    path, _ = ckpt
    engine = LLM(path, max_num_seqs=1).engine
    for i in range(4):
        engine.add_request(f"r{i}", [5, 6, 7, 8, 9], GREEDY)
    assert engine.not_started(10) == ["r3", "r2", "r1", "r0"]
    engine.step()  # r0 runs now
    assert engine.not_started(10) == ["r3", "r2", "r1"]
    assert engine.not_started(2) == ["r3", "r2"]
    for i in range(4):
        engine.abort(f"r{i}")
    assert_no_leaks(engine)


def test_preemption_takes_the_lowest_priority_even_if_older(ckpt):
    path, hf = ckpt
    # 5 blocks of 8 tokens: two 8-token prompts growing by 12 tokens (3 blocks each)
    engine = LLM(path, num_kv_blocks=5, block_size=8, max_num_seqs=2,
                 enable_prefix_caching=False).engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = {"background": list(range(10, 18)), "interactive": list(range(30, 38))}
    engine.add_request("background", prompts["background"], params, priority=1)
    engine.add_request("interactive", prompts["interactive"], params, priority=0)
    preempted: set[str] = set()
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        preempted |= {s.request.request_id for s in engine.scheduler.waiting}
    assert engine.stats()["num_preemptions"] > 0
    assert preempted == {"background"}  # the older, lower-priority one gave way
    for request_id, prompt in prompts.items():
        assert outputs[request_id] == hf_greedy(hf, prompt, 12)
    assert_no_leaks(engine)


def test_priority_must_be_an_integer(ckpt):
    engine = LLM(ckpt[0]).engine
    with pytest.raises(ValueError, match="priority"):
        engine.add_request("x", [5, 6], GREEDY, priority="high")
    assert_no_leaks(engine)


def test_http_schema_takes_priority_and_user():
    from pydantic import ValidationError

    from raysvc.serve.schema import CompletionRequest

    req = CompletionRequest(prompt="hi", priority=-5, user="team-a")
    assert (req.priority, req.user) == (-5, "team-a")
    with pytest.raises(ValidationError, match="priority"):
        CompletionRequest(prompt="hi", priority=2 ** 40)
    with pytest.raises(ValidationError, match="user"):
        CompletionRequest(prompt="hi", user="x" * 1000)
