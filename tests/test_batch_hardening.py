"""[batch] What one row or one second job must not do to a batch job, in process (no Ray
Data): a row that kills its engine is isolated and answered with an error line, identical
rows each get their own answer; the output file refuses a second writer and names a
damaged line.

References: the offline engine (`LLM`, greedy) for texts; the ledger's verdicts for which
row is to blame."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from raysvc.batch.openai_file import OutputFile
from raysvc.batch.quarantine import RowLedger
from raysvc.batch.stage import EngineStage, stable_id

ENGINE = {"num_kv_blocks": 256, "max_num_seqs": 16, "dtype": "float32"}


def _line(custom_id: str, prompt: str, max_tokens: int) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "ignore_eos": True}})


class _Remote:
    """An in-process stand-in for a Ray actor handle: `h.method.remote(...)` awaitable."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __getattr__(self, name):
        fn = getattr(self.obj, name)

        class _M:
            @staticmethod
            def remote(*args):
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(fn(*args))
                return fut
        return _M


class _Exited(BaseException):
    pass


def _stage(ledger=None) -> EngineStage:
    return EngineStage(None, ENGINE, "tiny", mode="openai", torch_threads=1,
                       ledger=None if ledger is None else _Remote(ledger))


def _poison(stage: EngineStage, custom_id: str) -> None:
    """The engine's step fails (not attributably to one request) whenever the request of
    `custom_id` is scheduled: what a crash in the forward pass looks like."""
    scheduler = stage.engine.engine.scheduler
    schedule, marker = scheduler.schedule, stable_id(custom_id)

    def poisoned():
        batch = schedule()
        if any(marker in item.seq.request.request_id for item in batch.scheduled):
            raise RuntimeError("device-side assert (simulated)")
        return batch

    scheduler.schedule = poisoned


def _run(stage: EngineStage, lines: list[str]) -> tuple[list[dict], bool]:
    """The stage's result for one batch (a list of one, or empty), and whether it ended
    its actor."""
    parts, exited = [], False

    async def main():
        try:
            parts.append(await stage({"line": np.array(lines, dtype=object)}))
        finally:
            await stage.engine.shutdown()

    try:
        asyncio.run(main())
    except _Exited:
        exited = True
    stage.engine._thread.shutdown(wait=True)  # no engine thread outlives its test
    return parts, exited


@pytest.fixture
def no_exit(monkeypatch):
    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)


def test_identical_rows_in_flight_each_get_their_own_answer(no_exit):
    """Two rows with the same body (custom_ids differ) run at once: each answered."""
    body = {"model": "tiny", "prompt": "The list type", "max_tokens": 6, "temperature": 0}
    lines = [json.dumps({"custom_id": c, "method": "POST", "url": "/v1/completions",
                         "body": body}) for c in ("a", "b")]
    parts, exited = _run(_stage(), lines)
    statuses = {c: s for p in parts for c, s in zip(p["custom_id"], p["status_code"],
                                                    strict=True)}
    assert not exited and statuses == {"a": 200, "b": 200}


def test_a_row_that_kills_its_engine_twice_is_answered_with_an_error(no_exit):
    from raysvc import LLM, SamplingParams

    ledger = RowLedger()
    lines = [_line(f"ok{i}", f"The set type {i}", 4) for i in range(3)]
    lines.insert(1, _line("poison", "A poison row", 4))

    # 1. all four in flight when the engine fails: all suspects, the actor ends
    stage = _stage(ledger)
    _poison(stage, "poison")
    parts, exited = _run(stage, lines)
    assert exited and ledger.suspects == {"ok0", "ok1", "ok2", "poison"}, ledger.suspects

    # 2. the restarted actor runs each suspect alone: the innocent finish, the poison row
    #    fails alone and is condemned
    stage = _stage(ledger)
    _poison(stage, "poison")
    parts, exited = _run(stage, lines)
    assert exited and set(ledger.condemned) == {"poison"}
    done = {c for p in parts for c in p["custom_id"]}
    assert done <= {"ok0", "ok1", "ok2"}

    # 3. next restart: the condemned row is an error line at once, the others complete
    stage = _stage(ledger)
    _poison(stage, "poison")
    parts, exited = _run(stage, lines)
    assert not exited
    rows = {c: (s, json.loads(o)) for p in parts
            for c, s, o in zip(p["custom_id"], p["status_code"], p["output"], strict=True)}
    assert rows["poison"][0] == 500
    assert rows["poison"][1]["response"]["body"]["error"]["code"] == "request_failed"
    expected = LLM(dtype="float32").generate(
        [f"The set type {i}" for i in range(3)],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    for i in range(3):
        status, out = rows[f"ok{i}"]
        assert status == 200
        assert out["response"]["body"]["choices"][0]["text"] == expected[i].outputs[0].text


def test_a_second_writer_of_one_output_is_refused(tmp_path):
    meta = {"format": 1, "input_sha256": "x", "model": None, "served_model_name": "tiny",
            "engine": {}, "created": 0}
    first = OutputFile(tmp_path / "out.jsonl")
    first.open(meta, overwrite=False)
    try:
        with pytest.raises(ValueError, match=f"another raysvc batch .pid {os.getpid()}"):
            OutputFile(tmp_path / "out.jsonl").open(meta, overwrite=False)
    finally:
        first.close()
    second = OutputFile(tmp_path / "out.jsonl")  # free again once the first let go
    second.open(meta, overwrite=False)
    second.close()


def test_a_damaged_middle_line_is_named(tmp_path):
    meta = {"format": 1, "input_sha256": "x", "model": None, "served_model_name": "tiny",
            "engine": {}, "created": 0}
    out = OutputFile(tmp_path / "out.jsonl")
    out.open(meta, overwrite=False)
    out.close()
    (tmp_path / "out.jsonl").write_text('{"custom_id": "a"}\nnot json at all\n'
                                        '{"custom_id": "c"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2: not an output line"):
        OutputFile(tmp_path / "out.jsonl").open(meta, overwrite=False)


def test_rows_name_lora_adapters_in_model(no_exit, tmp_path):
    """A batch row's `model` picks a LoRA adapter, as over HTTP; an unknown one is that
    row's 404 line; every row is the offline engine's answer with its adapter."""
    import torch
    from conftest import make_adapter
    from transformers import AutoModelForCausalLM

    from raysvc import LLM, SamplingParams
    from raysvc.engine.loading import resolve_model_path

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32)
    adapter = str(make_adapter(hf, tmp_path / "sql", 8, 16, ["q_proj", "v_proj"], False, 4))
    engine = {**ENGINE, "enable_lora": True, "lora_modules": {"tiny-sql": adapter}}
    lines = [json.dumps({"custom_id": f"{model}-{i}", "method": "POST",
                         "url": "/v1/completions",
                         "body": {"model": model, "prompt": f"The set type {i}",
                                  "max_tokens": 6, "temperature": 0, "ignore_eos": True}})
             for model in ("tiny", "tiny-sql", "nope") for i in range(2)]
    parts, exited = _run(EngineStage(None, engine, "tiny", mode="openai", torch_threads=1),
                         lines)
    rows = {c: (s, json.loads(o)) for p in parts
            for c, s, o in zip(p["custom_id"], p["status_code"], p["output"], strict=True)}
    assert not exited and len(rows) == 6
    llm = LLM(**{k: v for k, v in engine.items() if k != "num_kv_blocks"})
    for model, lora in (("tiny", None), ("tiny-sql", "tiny-sql")):
        expected = llm.generate([f"The set type {i}" for i in range(2)], SamplingParams(
            max_tokens=6, temperature=0, ignore_eos=True, lora_name=lora))
        for i in range(2):
            status, out = rows[f"{model}-{i}"]
            assert status == 200
            assert out["response"]["body"]["choices"][0]["text"] == \
                expected[i].outputs[0].text
    texts = {c: o["response"]["body"]["choices"][0]["text"] for c, (s, o) in rows.items()
             if s == 200}
    assert any(texts[f"tiny-{i}"] != texts[f"tiny-sql-{i}"] for i in range(2))
    for i in range(2):
        status, out = rows[f"nope-{i}"]
        assert status == 404
        assert out["response"]["body"]["error"]["code"] == "model_not_found"
