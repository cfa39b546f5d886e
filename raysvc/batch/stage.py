"""`EngineStage`: the Ray Data actor that holds one raysvc engine and keeps it full.

Ray Data hands the actor batches of rows (`map_batches` with an actor pool); the actor
runs every row of a batch as its own request, all at once, and several batches at once
(`max_concurrent_batches`), so its engine batches continuously across rows and batches and
its prefix cache serves rows that share a prefix. Each row goes through the same request
path as an HTTP request to `raysvc serve` (`OpenAIHandler` over an `EngineClient`): the
same checks, chat template, stop strings and response bodies, one code path.

Two row shapes:
- "openai" (the `raysvc batch` file): a row holds one line of an OpenAI batch file
  (`line`); the result is that line's output line (`output`), with its HTTP status.
- "prompt" (Ray Data pipelines, as `ray.data.llm` spells them): a row holds `prompt`
  (text) or `messages` (chat), and optional `sampling_params` (the request fields:
  max_tokens, temperature, ...); the results are `generated_text`, `num_input_tokens`,
  `num_generated_tokens` and `error` (None, or the error message a bad row earned).
A bad row never fails its batch: it gets its error, the other rows go on. A row whose
request breaks the engine itself is found by isolation and answered with an error line
(`raysvc/batch/quarantine.py`), so the job completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import numpy as np

from raysvc.serve.errors import APIError

LEDGER_TIMEOUT_S = 10.0


def stable_id(custom_id: str) -> str:
    """A request id derived from the row's custom_id: a rerun writes the same bytes."""
    return hashlib.sha256(custom_id.encode()).hexdigest()[:24]


class EngineStage:
    def __init__(self, model: str | None, engine_kwargs: dict[str, Any], served_name: str,
                 mode: str = "prompt", created: int = 0, torch_threads: int | None = None,
                 max_n: int = 16, ledger: Any = None) -> None:
        import torch

        from raysvc.batch.engine_client import EngineClient
        from raysvc.engine.async_engine import AsyncEngine
        from raysvc.engine.loading import load_tokenizer
        from raysvc.serve.handler import OpenAIHandler
        from raysvc.serve.planner import ModelFacts

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.engine = AsyncEngine(model, **{**engine_kwargs, "skip_tokenizer_init": True})
        llm = self.engine.engine
        tokenizer = load_tokenizer(llm.model_path)
        if tokenizer is None:
            raise ValueError(f"model {llm.model_path}: no tokenizer; batch requests need one")
        tokenizer.model_max_length = 1 << 62  # lengths are checked against the context here
        from raysvc.serve.tool_parsers import parser_for

        facts = ModelFacts(name=served_name, max_model_len=llm.max_model_len,
                           vocab_size=llm.model_config.vocab_size, max_n=max_n,
                           tool_parser=parser_for(getattr(tokenizer, "chat_template", None)),
                           loras=dict(engine_kwargs.get("lora_modules") or {}))
        self.handler = OpenAIHandler(tokenizer, facts, EngineClient(self.engine))
        self.served_name = served_name
        self.mode = mode
        self.created = created
        from raysvc.batch.quarantine import Isolation

        self.ledger = ledger  # a RowLedger actor: which rows killed an engine before
        self.isolation = Isolation()
        self._in_flight: set[str] = set()  # rows running in the engine now
        self._failed_alone: str | None = None  # the suspect whose turn alone failed it

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Every row of the batch as its own request, all at once. (Ray Data hands a
        batch's results back when the whole batch is done, so the batch size is what a
        killed job can lose: `raysvc batch` keeps it small and runs many at once.)"""
        rows = len(next(iter(batch.values())))
        keys = [self._key(batch, i) for i in range(rows)]
        status = await self._ledger_status(keys)
        results = await asyncio.gather(*(self._row(batch, i, keys[i], status.get(keys[i]))
                                         for i in range(rows)))
        # a row that ended because the engine failed must not be written as answered
        await self._exit_if_engine_failed()
        if self.mode == "openai":
            return {"custom_id": [r[0] for r in results], "output": [r[1] for r in results],
                    "status_code": [r[2] for r in results],
                    "prompt_tokens": [r[3] for r in results],
                    "output_tokens": [r[4] for r in results]}
        out = {k: list(v) for k, v in batch.items()}
        for key in ("generated_text", "num_input_tokens", "num_generated_tokens", "error"):
            out[key] = [r[key] for r in results]
        return out

    def _key(self, batch: dict[str, np.ndarray], i: int) -> str:
        if self.mode == "openai":
            return json.loads(batch["line"][i])["custom_id"]
        row = {k: _plain(v[i]) for k, v in batch.items()}
        return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()

    async def _ledger_status(self, keys: list[str]) -> dict[str, str]:
        if self.ledger is None:
            return {}
        return await asyncio.wait_for(self.ledger.status.remote(keys), LEDGER_TIMEOUT_S)

    async def _row(self, batch: dict[str, np.ndarray], i: int, key: str,
                   state: str | None):
        """One row: condemned rows are answered at once; a suspect runs alone."""
        if state == "condemned":
            return self._condemned(batch, i, key)
        suspect = state == "suspect"
        async with self.isolation.turn(key, suspect):
            ran = self.engine.failure is None  # else it fails at once: no part in the failure
            if ran:
                self._in_flight.add(key)
            try:
                if self.mode == "openai":
                    return await self._openai(batch["line"][i])
                return await self._prompt({k: v[i] for k, v in batch.items()})
            finally:
                if self.engine.failure is None:
                    self._in_flight.discard(key)
                elif ran and suspect and self._failed_alone is None:
                    self._failed_alone = key  # the engine failed during its turn alone

    def _condemned(self, batch: dict[str, np.ndarray], i: int, key: str):
        message = ("this request failed its engine twice, the second time running alone; "
                   "it is not retried")
        if self.mode != "openai":
            return {"generated_text": None, "num_input_tokens": 0, "num_generated_tokens": 0,
                    "error": message}
        body = APIError(500, message, type="internal_error", code="request_failed").body()
        return (key, json.dumps(_output_line(key, 500, body)), 500, 0, 0)

    async def _exit_if_engine_failed(self) -> None:
        """A failed engine cannot finish its rows, and its 500s must not be written as
        answers: tell the ledger which rows were in flight (the suspect running alone,
        if one was, is condemned), then end this actor; Ray Data restarts it and runs
        the batch again."""
        failure = self.engine.failure
        if failure is None:
            return
        import logging
        import os

        logging.getLogger(__name__).error("engine failed (%r) with %d row(s) in flight; "
                                          "restarting the actor", failure,
                                          len(self._in_flight))
        if self.ledger is not None:
            try:
                await asyncio.wait_for(self.ledger.engine_failed.remote(
                    sorted(self._in_flight), self._failed_alone, repr(failure)),
                    LEDGER_TIMEOUT_S)
            except Exception as e:  # the restart still happens; the rows only lose a strike
                logging.getLogger(__name__).warning("row ledger unreachable: %r", e)
        os._exit(1)

    async def _respond(self, url: str, body: Any, request_key: str) -> tuple[int, dict]:
        """(HTTP status, response body) exactly as `raysvc serve` would answer."""
        chat = url == "/v1/chat/completions"
        try:
            if url not in ("/v1/completions", "/v1/chat/completions"):
                raise APIError(404, f"url: {url!r} is not served in a batch; use "
                                    f"/v1/completions or /v1/chat/completions", param="url",
                               type="not_found_error", code="unsupported_url")
            if not isinstance(body, dict):
                raise APIError(400, "body: must be a JSON object", param="body")
            if body.get("stream"):
                raise APIError(400, "stream: a batch request cannot stream", param="stream")
            started = self.handler.start(json.dumps(body).encode(), chat,
                                         id_suffix=stable_id(request_key),
                                         created=self.created)
            response = await self.handler.collect(started)
            return 200, json.loads(response.model_dump_json())
        except APIError as e:
            return e.status, e.body()

    async def _openai(self, line: str) -> tuple[str, str, int, int, int]:
        """One line of an OpenAI batch file -> (custom_id, output line, status, tokens)."""
        env = json.loads(line)  # the envelope was checked before the job started
        custom_id = env["custom_id"]
        if env["method"] != "POST":
            status, body = 405, APIError(405, f"method: {env['method']!r} is not allowed; "
                                              f"use POST", param="method").body()
        else:
            status, body = await self._respond(env["url"], env["body"], custom_id)
        usage = body.get("usage") or {}
        return (custom_id, json.dumps(_output_line(custom_id, status, body)), status,
                int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))

    async def _prompt(self, row: dict[str, Any]) -> dict[str, Any]:
        params = row.get("sampling_params")
        params = dict(params) if isinstance(params, dict) else {}
        messages = row.get("messages")
        if messages is not None:
            url, body = "/v1/chat/completions", {**params, "messages": _plain(messages)}
        else:
            url, body = "/v1/completions", {**params, "prompt": _plain(row.get("prompt"))}
        body.setdefault("model", self.served_name)
        status, resp = await self._respond(url, body, json.dumps(body, sort_keys=True,
                                                                  default=str))
        if status != 200:
            return {"generated_text": None, "num_input_tokens": 0, "num_generated_tokens": 0,
                    "error": resp["error"]["message"]}
        choice = resp["choices"][0]
        text = choice["message"]["content"] if messages is not None else choice["text"]
        return {"generated_text": text, "num_input_tokens": resp["usage"]["prompt_tokens"],
                "num_generated_tokens": resp["usage"]["completion_tokens"], "error": None}


def _output_line(custom_id: str, status: int, body: dict) -> dict:
    """One line of an OpenAI batch output file."""
    return {"id": f"batch_req_{stable_id(custom_id)}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": body.get("id", ""),
                         "body": body},
            "error": None}


def _plain(value: Any) -> Any:
    """Arrow/numpy values (arrays of dicts, numpy scalars) as plain JSON-able Python."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
