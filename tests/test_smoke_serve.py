"""Smoke test of README's first command: the installed `raysvc serve` console script, with
its defaults (local Ray, built-in model), answers one completion and one chat completion
through the official OpenAI client.

Every other server test passes flags; this one runs what a new user runs, so an ingress
that cannot start (a replica dying on import, say) fails CI here, by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    script = Path(sys.executable).parent / "raysvc"
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    port = _free_port()
    log = tmp_path_factory.mktemp("smoke") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "RAYSVC_API_KEY"):
        env.pop(name, None)
    proc = subprocess.Popen([str(script), "serve", "--port", str(port)], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"raysvc serve exited {proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200 and "raysvc is serving" in log.read_text():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"raysvc serve not ready in 240 s:\n{log.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_default_serve_answers_completion_and_chat(default_server):
    from openai import OpenAI

    url, log = default_server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    (model,) = [m.id for m in client.models.list().data]
    assert model == "tiny"
    completion = client.completions.create(model=model, prompt="The list type", max_tokens=8,
                                           temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=8,
        temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]
