"""The real server end to end: `raysvc serve` (embedded Ray + Serve on 127.0.0.1), driven
with the official `openai` client and raw aiohttp, against the offline engine as oracle.

One server for the whole module (started once, ~20 s), stopped by the last test with
SIGTERM. Greedy outputs must equal `LLM.generate`'s on the same prompts, token for token
(compared as text and as token counts).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from raysvc import LLM, SamplingParams

API_KEY = "test-key"
MAX_BODY = 65536
NUM_KV_BLOCKS = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`raysvc serve` in a subprocess; `extra` replaces this module's flags."""

    def __init__(self, tmp: Path, extra: list[str] | None = None,
                 api_key: str | None = API_KEY, more: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAYSVC_API_KEY", None)
        if api_key:
            env["RAYSVC_API_KEY"] = api_key
        env.pop("RAY_ADDRESS", None)
        flags = extra if extra is not None else [
            "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "32",
            "--max-body-bytes", str(MAX_BODY), "--max-n", "4", "--worker-threads", "1",
            "--num-cpus", "2", "--min-workers", "1", "--max-workers", "2",
            # an elastic pool that never grows here: its stats, not its scaling
            "--worker-autoscaling", '{"upscale_delay_s": 3600}', "--ingress-replicas", "1",
            "--max-structured-output-bytes", "16384"]
        cmd = [sys.executable, "-m", "raysvc.cli", "serve", "--port", str(self.port), *flags,
               *more]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200 and "raysvc is serving" in self.output():
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()[-5000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return self.proc.wait(timeout=30)
        return self.proc.returncode


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Random PEFT LoRA adapters of the built-in model: `tiny-sql` is served from the
    start, `tiny-chat` is loaded at run time."""
    import torch
    from conftest import make_adapter
    from transformers import AutoModelForCausalLM

    from raysvc.engine.loading import resolve_model_path

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32)
    root = tmp_path_factory.mktemp("lora")
    return {"tiny-sql": make_adapter(hf, root / "sql", 8, 16,
                                     ["q_proj", "v_proj", "o_proj", "down_proj"], False, seed=1),
            "tiny-chat": make_adapter(hf, root / "chat", 4, 8, ["k_proj", "gate_proj", "up_proj"],
                                      True, seed=2)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapters):
    srv = Server(tmp_path_factory.mktemp("serve"),
                 more=("--lora-modules", f"tiny-sql={adapters['tiny-sql']}", "--max-loras", "2",
                       "--allow-runtime-lora-updating"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def llm(adapters):
    return LLM(num_kv_blocks=256, enable_lora=True, max_loras=2,
               lora_modules={name: str(path) for name, path in adapters.items()})


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _stats(server) -> dict:
    import urllib.request

    req = urllib.request.Request(server.url + "/cluster/stats",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_all_free(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(server)
        w = stats["workers"][0]
        if (w["kv_blocks_free"] == w["kv_blocks_total"] and w["running"] == 0
                and w["requests_in_flight"] == 0 and stats["queue_len"] == 0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not freed: {stats}")
        time.sleep(0.2)


PROMPTS = ["The list type", "def f(x):", "Python's dict"]


def test_models_health_and_stats(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-sql"]
    assert models.data[1].model_extra["parent"] == "tiny"  # vLLM's shape for an adapter
    stats = _stats(server)
    (w,) = stats["workers"]
    for key in ("worker_id", "node_id", "pid", "running", "waiting", "kv_blocks_free",
                "kv_blocks_total", "requests_routed", "prefix_cache_hits",
                "prefix_cache_queries"):
        assert key in w, key
    assert w["kv_blocks_total"] == NUM_KV_BLOCKS
    assert w["state"] == "ready"
    assert (stats["target_workers"], stats["min_workers"], stats["max_workers"]) == (1, 1, 2)
    assert stats["ready_workers"] == 1 and stats["scaling_decisions"] == []
    assert stats["autoscaling"]["upscale_delay_s"] == 3600
    import urllib.request

    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["ready"] == 1 and health["starting"] == 0


def test_completions_greedy_equal_offline_engine(client, llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = llm.generate(PROMPTS, params)
    for prompt, exp in zip(PROMPTS, expected, strict=True):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                        temperature=0)
        choice = out.choices[0]
        assert choice.text == exp.outputs[0].text
        assert choice.finish_reason == exp.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert out.usage.completion_tokens == len(exp.outputs[0].token_ids)
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_lora_adapter_named_by_model_mixed_with_base_requests(server, client, llm):
    """`model` picks the adapter; adapter and base requests run at once on one worker, each
    equal to the offline engine's (itself tested against PEFT in test_lora.py)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    params = SamplingParams(temperature=0, max_tokens=16)
    base = llm.generate(PROMPTS, params)
    tuned = llm.generate(PROMPTS, params.model_copy(update={"lora_name": "tiny-sql"}))
    assert any(b.outputs[0].token_ids != t.outputs[0].token_ids
               for b, t in zip(base, tuned, strict=True))

    def ask(model: str, prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                         temperature=0).choices[0].text

    jobs = [(m, p, exp) for p, b, t in zip(PROMPTS, base, tuned, strict=True)
            for m, exp in (("tiny", b), ("tiny-sql", t))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: ask(j[0], j[1]), jobs))
    assert got == [exp.outputs[0].text for _, _, exp in jobs]
    with pytest.raises(openai.NotFoundError) as e:
        ask("tiny-nosql", PROMPTS[0])
    assert e.value.code == "model_not_found" and "tiny-sql" in e.value.message
    (w,) = _wait_all_free(server)["workers"]
    assert w["loras"] == ["tiny-sql"]


def _post_text(server, path: str, body: dict) -> tuple[int, str]:
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + path, json=body,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                return r.status, await r.text()

    return asyncio.run(main())


def test_lora_adapters_loaded_and_unloaded_at_run_time(server, client, llm, adapters,
                                                       tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: the adapter serves at
    once (equal to the offline engine), is listed, then gone; bad loads name the cause."""
    import openai

    prompt = PROMPTS[1]
    want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                 lora_name="tiny-chat"))[0].outputs[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4)
    status, text = _post_text(server, "/v1/load_lora_adapter",
                              {"lora_name": "tiny-chat", "lora_path": str(adapters["tiny-chat"])})
    assert (status, text) == (200, "Success: LoRA adapter 'tiny-chat' added successfully.")
    assert "tiny-chat" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12,
                                    temperature=0)
    assert out.choices[0].text == want
    # taken names and bad directories: 400 naming the cause; nothing changes
    status, text = _post_text(server, "/v1/load_lora_adapter",
                              {"lora_name": "tiny-sql", "lora_path": str(adapters["tiny-chat"])})
    assert status == 400 and "already been loaded" in text
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{}")
    status, text = _post_text(server, "/v1/load_lora_adapter",
                              {"lora_name": "broken", "lora_path": str(tmp_path / "broken")})
    assert status == 400 and "adapter_model.safetensors is missing" in text
    status, text = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and "lora_path" in text

    status, text = _post_text(server, "/v1/unload_lora_adapter", {"lora_name": "tiny-chat"})
    assert (status, text) == (200, "Success: LoRA adapter 'tiny-chat' removed successfully.")
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-sql"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4)
    status, text = _post_text(server, "/v1/unload_lora_adapter", {"lora_name": "tiny-chat"})
    assert status == 404 and "cannot be found" in text
    _wait_all_free(server)


def test_completions_batch_of_prompts_and_token_ids(client, llm):
    tok = llm.tokenizer
    ids = tok.encode(PROMPTS[1])
    out = client.completions.create(model="tiny", prompt=[PROMPTS[0], PROMPTS[2]],
                                    max_tokens=8, temperature=0)
    exp = llm.generate([PROMPTS[0], PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8))
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [e.outputs[0].text for e in exp]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == llm.generate([ids], SamplingParams(
        temperature=0, max_tokens=8))[0].outputs[0].text


def test_chat_greedy_equal_offline_engine(client, llm):
    messages = [{"role": "system", "content": "You answer about Python."},
                {"role": "user", "content": "What is a list?"}]
    tok = llm.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True),
                     add_special_tokens=False)
    exp = llm.generate([ids], SamplingParams(temperature=0, max_tokens=20))[0]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                         temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == exp.outputs[0].text
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(exp.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == exp.outputs[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        len(exp.outputs[0].token_ids)


def test_sse_framing_raw(server):
    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "tiny", "prompt": "The list type", "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.post(server.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                raw = (await r.read()).decode()
            chat_body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                         "stream": True}
            async with s.post(server.url + "/v1/chat/completions", json=chat_body) as r:
                assert r.status == 200
                chat = (await r.read()).decode()
        return raw, chat

    raw, chat = asyncio.run(main())
    chat_events = [json.loads(e[6:]) for e in chat.split("\n\n")[:-2]]
    assert chat.endswith("data: [DONE]\n\n")
    assert chat_events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in e and "role" not in e["choices"][0]["delta"]
               for e in chat_events[1:])
    assert chat_events[-1]["choices"][0]["finish_reason"] == "length"
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 12
    body = payloads[:-1]
    assert all(p["object"] == "text_completion" and p["usage"] is None for p in body)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in body[:-1])


def test_n_seed_temperature_top_p(client):
    kw = dict(model="tiny", prompt="The list type", max_tokens=12, temperature=0.9,
              top_p=0.9, n=3, seed=7, logprobs=0)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # the samples differ
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_strings(client, llm):
    full = llm.generate(["The list type"], SamplingParams(temperature=0, max_tokens=32,
                                                          ignore_eos=True))[0].outputs[0].text
    stop = full[10:14]
    assert stop.strip() and full.find(stop) >= 0
    expected = full[:full.find(stop)]
    kw = dict(model="tiny", prompt="The list type", max_tokens=32, temperature=0,
              stop=[stop], extra_body={"ignore_eos": True})
    out = client.completions.create(**kw)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == expected
    kept = client.completions.create(**{**kw, "extra_body": {
        "ignore_eos": True, "include_stop_str_in_output": True}})
    assert kept.choices[0].text == expected + stop


def test_logprobs_and_echo(client, llm):
    exp = llm.generate(["The list type"], SamplingParams(temperature=0, max_tokens=6,
                                                         logprobs=2))[0].outputs[0]
    out = client.completions.create(model="tiny", prompt="The list type", max_tokens=6,
                                    temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(exp.token_ids) == len(lp.token_logprobs)
    for got, token, step in zip(lp.token_logprobs, exp.token_ids, exp.logprobs, strict=True):
        assert got == pytest.approx(step[token].logprob, abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}],
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    echo = client.completions.create(model="tiny", prompt="The list type", max_tokens=6,
                                     temperature=0, echo=True)
    assert echo.choices[0].text == "The list type" + exp.text


def test_64_concurrent_streaming_clients(server):
    from openai import AsyncOpenAI

    async def main():
        c = AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                        timeout=300)

        async def one(i: int) -> tuple[int, str | None]:
            stream = await c.completions.create(
                model="tiny", prompt=f"Request {i}: the list type", max_tokens=16,
                temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            tokens, reason = 0, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return tokens, reason

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await c.close()

    results = asyncio.run(main())
    assert results == [(16, "length")] * 64
    _wait_all_free(server)


def test_client_disconnect_aborts_and_frees_blocks(server):
    before = _stats(server)["workers"][0]["num_generated_tokens"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": "The list type", "max_tokens": 480, "n": 4,
            "temperature": 0.8, "ignore_eos": True}

    async def streaming():
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.post(server.url + "/v1/completions",
                              json={**body, "stream": True}) as r:
                assert r.status == 200
                for _ in range(3):
                    await r.content.readline()
            # leaving the block closes the connection mid-stream

    async def blocking():
        async with aiohttp.ClientSession(headers=headers) as s:
            try:
                await s.post(server.url + "/v1/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=1.0))
            except TimeoutError:
                pass

    asyncio.run(streaming())
    _wait_all_free(server)
    asyncio.run(blocking())
    stats = _wait_all_free(server)
    generated = stats["workers"][0]["num_generated_tokens"] - before
    assert generated < 2 * 4 * 480 * 0.9, generated  # both were cut short


# -- bad input: 4xx in OpenAI's error shape, the server serving on ---------------------


def _get(server, path: str, auth: bool = True) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + path, headers=headers),
                                    timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _post(server, path: str, body: bytes | dict, headers: dict | None = None):
    async def main():
        h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
             **(headers or {})}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + path, data=data, headers=h) as r:
                return r.status, await r.json(content_type=None)

    return asyncio.run(main())


def _assert_error(status: int, body: dict, expected: int, param: str | None = None) -> None:
    assert status == expected, (status, body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err


COMPLETIONS_BAD = [
    (b"{not json", 400, None),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "stream": "maybe"}, 400, "stream"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ({"prompt": [5] * 600}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": [5, 4096]}, 400, "prompt"),
    ({"prompt": [5, -1]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
    (b"\xff\xfe{\"prompt\": \"x\"}", 400, None),
    (b"[1, 2]", 400, None),
    # values that once reached the engine's step and failed it there
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "x", "repetition_penalty": Infinity}', 400, "repetition_penalty"),
    (b'{"prompt": "x", "presence_penalty": NaN}', 400, "presence_penalty"),
    ({"prompt": "x", "top_k": 2 ** 63}, 400, "top_k"),
    ({"prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ({"prompt": "x", "stop_token_ids": [10 ** 6], "min_tokens": 1}, 400, "stop_token_ids"),
    # what one request may cost (the server's default limits)
    ({"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ({"prompt": "x", "stop": ["x" * 257]}, 400, "stop"),
    ({"prompt": "x", "bad_words": [f"w{i}" for i in range(65)]}, 400, "bad_words"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ({"prompt": "x", "guided_regex": "a" * 20000}, 400, "guided_regex"),  # limit 16384
]

CHAT_BAD = [
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", COMPLETIONS_BAD)
def test_bad_completion_requests(server, body, status, param):
    _assert_error(*_post(server, "/v1/completions", body), status, param)


@pytest.mark.parametrize("body,status,param", CHAT_BAD)
def test_bad_chat_requests(server, body, status, param):
    _assert_error(*_post(server, "/v1/chat/completions", body), status, param)


def test_body_over_limit_auth_and_unknown_route(server):
    _assert_error(*_post(server, "/v1/completions", {"prompt": "x" * MAX_BODY}), 413)
    _assert_error(*_post(server, "/v1/completions", {"prompt": "x"},
                         headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(*_post(server, "/v1/completions", {"prompt": "x"},
                         headers={"Authorization": ""}), 401)
    _assert_error(*_post(server, "/v1/nothing", {"prompt": "x"}), 404)


def test_server_serves_on_after_bad_input(server, client):
    out = client.completions.create(model="tiny", prompt="The list type", max_tokens=4,
                                    temperature=0)
    assert out.usage.completion_tokens == 4 or out.choices[0].finish_reason == "stop"
    _wait_all_free(server)


def test_bench_serve_runs_against_the_server(server, tmp_path):
    out_json = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "raysvc.cli", "bench", "serve", "--url", server.url,
         "--api-key", API_KEY, "--num-prompts", "8", "--concurrency", "4", "--input-len", "16",
         "--output-len", "8", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| path | req/s | output tok/s |" in out.stdout and "machine:" in out.stdout
    report = json.loads(out_json.read_text())
    (row,) = report["results"]
    assert row["completed"] == 8 and row["total_output_tokens"] == 64
    assert row["p50_ttft_ms"] > 0 and row["p99_itl_ms"] >= row["p50_itl_ms"]


def test_metrics_on_the_api_port(server, client):
    """GET /metrics gathers raysvc's families from Ray's metrics agents (names as a
    Prometheus scrape of the agents sees them), once each, HELP and TYPE first."""
    import urllib.request

    client.completions.create(model="tiny", prompt="The list type", max_tokens=4)
    wanted = ("ray_raysvc_num_requests_running", "ray_raysvc_kv_cache_usage_perc",
              "ray_raysvc_workers_ready", "ray_raysvc_time_to_first_token_seconds_bucket",
              "ray_raysvc_prefix_cache_queries")
    # behind the API key (no --metrics-public here), as are FastAPI's docs (not enabled)
    for path in ("/metrics", "/docs", "/openapi.json"):
        status, body = _get(server, path, auth=False)
        assert status == (401 if path == "/metrics" else 404), (path, status, body)
    authorized = urllib.request.Request(server.url + "/metrics",
                                        headers={"Authorization": f"Bearer {API_KEY}"})
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray's agents export every few seconds
        with urllib.request.urlopen(authorized, timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert all(name in text for name in wanted), [n for n in wanted if n not in text]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))  # one family block per name
    assert all(line.startswith(("#", "ray_raysvc_")) for line in text.splitlines() if line)


def test_sigterm_shuts_down_cleanly(server):
    _wait_all_free(server)
    start = time.monotonic()
    assert server.stop() == 0, server.output()[-3000:]
    took = time.monotonic() - start
    out = server.output()
    assert "raysvc serve: stopped" in out
    assert "Traceback" not in out and "*** SIGTERM received" not in out, out[-3000:]
    # Idle, nothing may wait out a grace period (the ingress's is 600 s, the drain's 30 s):
    # Serve's own teardown takes 1-4 s on a busy 2-core machine.
    assert took < 10.0, f"idle shutdown took {took:.1f}s"

