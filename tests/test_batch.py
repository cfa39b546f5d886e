"""[batch] `raysvc batch` end to end (subprocesses, each with its own local Ray) and
`build_processor` inside a Ray Data pipeline.

References: the offline engine (`LLM`, greedy) for every generated text; an uninterrupted
run's output bytes for a run that was SIGKILLed and resumed; the input file for "one line
per custom_id". Failure injection: SIGKILL of the whole job (its process group), SIGKILL
of an engine actor (`ray::MapWorker(MapBatches(EngineStage))`), a torn last output line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysvc.bench.chaos import processes, rss_mb

ENGINE = ["--num-kv-blocks", "256", "--max-num-seqs", "16", "--worker-threads", "1",
          "--dtype", "float32"]


def _line(custom_id, url="/v1/completions", method="POST", **body):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": {"model": "tiny", **body}})


def _completion(i, max_tokens=8):
    return _line(f"c{i}", prompt=f"The {['list', 'dict', 'set'][i % 3]} type {i} is",
                 max_tokens=max_tokens, temperature=0)


def _chat(i, max_tokens=8):
    return _line(f"m{i}", url="/v1/chat/completions", max_tokens=max_tokens, temperature=0,
                 messages=[{"role": "user", "content": f"What is a tuple {i}?"}])


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _batch(inp, out, *flags, timeout=600, wait=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raysvc.cli", "batch", str(inp), str(out), *ENGINE, *flags]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _rows(out: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    return {r["custom_id"]: r for r in rows}


@pytest.fixture(scope="module")
def llm():
    from raysvc import LLM

    return LLM(num_kv_blocks=512, dtype="float32")


def test_bad_envelopes_exit_2_naming_every_line_before_any_work(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [
        _completion(0), "not json", "[1, 2]", json.dumps({"custom_id": "x", "url": "/v1/x"}),
        _completion(1), _completion(0), json.dumps({"custom_id": "", "method": "POST",
                                                    "url": "/v1/completions", "body": {}})])
    out = tmp_path / "out.jsonl"
    r = _batch(inp, out, timeout=120)
    assert r.returncode == 2, r.stderr
    for expected in ("in.jsonl:2: not JSON", "in.jsonl:3: not a JSON object",
                     "in.jsonl:4: missing method, body", "in.jsonl:6: custom_id 'c0' repeats "
                     "line 1", "in.jsonl:7: custom_id must be a non-empty string",
                     "5 bad line(s)", "nothing was generated"):
        assert expected in r.stderr, r.stderr
    assert not out.exists()


def test_rows_match_the_engine_and_bad_bodies_get_their_own_4xx_line(tmp_path, llm):
    from raysvc import SamplingParams
    from raysvc.engine.loading import load_tokenizer

    good = [_completion(i) for i in range(6)] + [_chat(i) for i in range(3)]
    bad = [_line("b-temp", prompt="x", temperature=9), _line("b-url", url="/v1/embeddings"),
           _line("b-model", prompt="x", model="gpt-4"), _line("b-get", method="GET",
                                                             prompt="x"),
           _line("b-prompt", max_tokens=4), _line("b-stream", prompt="x", stream=True)]
    inp = _write(tmp_path / "in.jsonl", good + bad)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    r = _batch(inp, out, "--summary-json", str(summary))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(out)
    assert set(rows) == {json.loads(x)["custom_id"] for x in good + bad}
    s = json.loads(summary.read_text())
    assert (s["total"], s["completed"], s["failed"], s["resumed"]) == (15, 9, 6, 0)
    assert s["output_tokens"] == 9 * 8 and s["seconds"] > 0
    for cid, status, param in [("b-temp", 400, "temperature"), ("b-url", 404, "url"),
                               ("b-model", 404, "model"), ("b-get", 405, "method"),
                               ("b-prompt", 400, "prompt"), ("b-stream", 400, "stream")]:
        resp = rows[cid]["response"]
        assert resp["status_code"] == status and resp["body"]["error"]["param"] == param, resp
    # every good row: the offline engine's greedy text, in OpenAI's response shape
    tok = load_tokenizer(llm.engine.model_path)
    params = SamplingParams(max_tokens=8, temperature=0)
    for line in good:
        env = json.loads(line)
        row = rows[env["custom_id"]]
        assert row["id"].startswith("batch_req_") and row["error"] is None
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200 and row["response"]["request_id"] == body["id"]
        if env["url"] == "/v1/completions":
            expected = llm.generate([env["body"]["prompt"]], params)[0].outputs[0].text
            assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
        else:
            text = tok.apply_chat_template(env["body"]["messages"], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            expected = llm.generate([ids], params)[0].outputs[0].text
            assert body["choices"][0]["message"]["content"] == expected
        assert body["usage"]["completion_tokens"] == 8


@pytest.fixture(scope="module")
def long_job(tmp_path_factory):
    """60 rows of 24 tokens, and the output of an uninterrupted run."""
    d = tmp_path_factory.mktemp("long")
    inp = _write(d / "in.jsonl", [_completion(i, 24) for i in range(45)]
                 + [_chat(i, 24) for i in range(15)])
    out = d / "clean.jsonl"
    r = _batch(inp, out)
    assert r.returncode == 0, r.stdout + r.stderr
    return inp, out.read_text()


def test_sigkill_of_the_whole_job_then_rerun_gives_every_row_once(tmp_path, long_job):
    inp, clean = long_job
    out = tmp_path / "out.jsonl"
    job = _batch(inp, out, "--batch-size", "4", wait=False)
    deadline = time.monotonic() + 300
    while not (out.exists() and len(out.read_text().splitlines()) >= 8):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its whole local Ray
    job.wait(timeout=60)
    partial = len(out.read_text().splitlines())
    assert 8 <= partial < 60
    with out.open("a") as f:  # and a torn line, as a kill mid-write would leave
        f.write('{"id": "batch_req_torn", "custom_id": "c4')
    summary = tmp_path / "s.json"
    r = _batch(inp, out, "--summary-json", str(summary))
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(summary.read_text())
    assert s["resumed"] == partial and s["completed"] == 60 - partial
    assert sorted(out.read_text().splitlines()) == sorted(clean.splitlines())  # byte for byte


def test_a_killed_engine_actor_loses_and_repeats_no_row(tmp_path, long_job):
    inp, clean = long_job
    out = tmp_path / "out.jsonl"
    job = _batch(inp, out, "--batch-size", "4", wait=False)
    deadline, killed = time.monotonic() + 300, None
    while killed is None:
        assert job.poll() is None and time.monotonic() < deadline
        actors = [p for p, t in processes(job.pid).items() if "MapWorker" in t]
        if actors and out.exists() and len(out.read_text().splitlines()) >= 4:
            killed = actors[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    assert sorted(out.read_text().splitlines()) == sorted(clean.splitlines())


def test_changed_input_refuses_to_resume_unless_overwrite(tmp_path, long_job):
    inp, clean = long_job
    out = tmp_path / "out.jsonl"
    out.write_text(clean)  # the finished job's output and its meta file, elsewhere
    Path(f"{out}.meta.json").write_text(Path(f"{inp.parent / 'clean.jsonl'}.meta.json")
                                        .read_text())
    r = _batch(inp, out, timeout=300)  # same input: everything done, nothing to run
    assert r.returncode == 0 and "60 resumed" in r.stderr, r.stderr
    changed = _write(tmp_path / "in2.jsonl", inp.read_text().splitlines()[:-1])
    r = _batch(changed, out, timeout=300)
    assert r.returncode == 2 and "input_sha256" in r.stderr and "--overwrite" in r.stderr
    r = _batch(changed, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(_rows(out)) == 59


def test_driver_memory_does_not_grow_with_the_file(tmp_path):
    """The driver streams: 200k lines cost it about what 20k do (all rows here are refused
    by the url check, so the run is about moving rows, not generating tokens). Measured as
    private memory (RssAnon): the object-store pages the driver reads rows from are shared
    and bounded by the store, and would blur the comparison (measured: +37 MB of them
    at 300k rows, 0 once released)."""
    def peak_rss(n: int) -> tuple[float, int]:
        inp = tmp_path / f"in{n}.jsonl"
        with inp.open("w") as f:
            for i in range(n):
                f.write(_line(f"r{i}", url="/v1/embeddings", input="x") + "\n")
        out = tmp_path / f"out{n}.jsonl"
        job = _batch(inp, out, "--batch-size", "512", wait=False)
        peak = 0.0
        while job.poll() is None:
            peak = max(peak, rss_mb(job.pid, "RssAnon") or 0.0)
            time.sleep(0.1)
        assert job.returncode == 0, job.stdout.read()[-3000:]
        return peak, sum(1 for _ in out.open())

    small, n_small = peak_rss(20_000)
    large, n_large = peak_rss(200_000)
    assert (n_small, n_large) == (20_000, 200_000)
    # 180k more rows (~50 MB of output): a few MB (the input check keeps 8 bytes a row)
    assert large - small < 25, (small, large)


def test_processor_in_a_user_pipeline(llm):
    from conftest import fresh_ray

    from raysvc import SamplingParams
    from raysvc.batch import ProcessorConfig, build_processor

    ray = fresh_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        questions = [f"The {w} type is" for w in ("list", "dict", "set", "tuple", "str")]
        ds = ray.data.from_items([{"q": q, "n": i} for i, q in enumerate(questions)])
        processor = build_processor(
            ProcessorConfig(engine_kwargs={"num_kv_blocks": 128, "dtype": "float32"},
                            concurrency=1, batch_size=2, torch_threads=1),
            preprocess=lambda row: {**row, "prompt": row["q"],
                                    "sampling_params": {"max_tokens": 6, "temperature": 0.0}},
            postprocess=lambda row: {"n": row["n"], "answer": row["generated_text"],
                                     "tokens": row["num_generated_tokens"],
                                     "error": row["error"]})
        rows = sorted(processor(ds).take_all(), key=lambda r: r["n"])
        expected = [o.outputs[0].text for o in llm.generate(
            questions, SamplingParams(max_tokens=6, temperature=0))]
        assert [r["answer"] for r in rows] == expected
        assert all(r["tokens"] == 6 and r["error"] is None for r in rows)
        bad = build_processor(ProcessorConfig(engine_kwargs={"num_kv_blocks": 64}),
                              preprocess=lambda row: {"prompt": "x",
                                                      "sampling_params": {"top_p": 7}})
        (row,) = bad(ray.data.from_items([{"a": 1}])).take_all()
        assert row["generated_text"] is None and "top_p" in row["error"]  # not a crash
    finally:
        ray.shutdown()


def test_processor_config_refuses_bad_values():
    from raysvc.batch import ProcessorConfig

    for kw, field in [({"concurrency": 0}, "concurrency"), ({"concurrency": (3, 2)},
                                                             "concurrency"),
                      ({"engine_kwargs": {"max_num_seqs": 0}}, "max_num_seqs"),
                      ({"batch_size": 0}, "batch_size"), ({"modle": "x"}, "modle")]:
        with pytest.raises(ValueError, match=field):
            ProcessorConfig(**kw)
