"""[openai-compat] What vLLM users' clients send, against a real `raysvc serve`, with the
official `openai` client and raw HTTP: lenient fields, prompt scoring (echo + logprobs,
max_tokens 0, prompt_logprobs) against the offline engine and HF's log-softmax, the ops
endpoints, CORS, tool-call history and tools in the template, EOS reported as vLLM does,
usage in every chunk, and what is refused (naming the field)."""

from __future__ import annotations

import json
import math
import re
import urllib.request

import pytest
import torch
from test_serve import Server

from raysvc import LLM, SamplingParams

PROMPT = "The list type is a mutable sequence"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("compat"), api_key=None, extra=[
        "--num-kv-blocks", "256", "--max-num-seqs", "16", "--worker-threads", "1",
        "--num-cpus", "2", "--ingress-replicas", "1"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=256)


def _post(server, path: str, body: dict, method: str = "POST", headers: dict | None = None):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def _tokenizer():
    from raysvc.engine.loading import load_tokenizer
    from raysvc.models.builtin import path

    return load_tokenizer(path("tiny"))


# -- leniency ---------------------------------------------------------------------------


def test_runtime_lora_routes_are_off_unless_enabled(server):
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        status, body, _ = _post(server, path, {"lora_name": "x", "lora_path": "/tmp"})
        assert status == 404, (path, body)


def test_fields_openai_defines_are_accepted_and_numbers_coerced(server, client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi", "name": "ada"}],
        max_tokens=4, metadata={"team": "x"}, store=False, service_tier="auto",
        reasoning_effort="low", user="u1",
        extra_body={"functions": [{"name": "f", "parameters": {}}], "top_k": 5.0,
                    "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].finish_reason == "length"
    status, body, _ = _post(server, "/v1/completions",
                            {"prompt": "x", "max_tokens": 5.0, "n": "1", "seed": "7"})
    assert status == 200 and body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": 5.5}, "max_tokens"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x", "seed": 2 ** 70}, "seed"),
    ({"prompt": "x", "logit_bias": {"five": 10}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 300}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"prompt": "x", "allowed_token_ids": [1, 10 ** 7]}, "allowed_token_ids"),
    ({"prompt": "x", "guided_json": {"type": "frob"}}, "guided_json"),
    ({"prompt": "x", "guided_regex": "(a"}, "guided_regex"),
    ({"prompt": "x", "structured_outputs": {"grammar": "root ::= nowhere"}},
     "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs"),
    ({"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 scores a prompt: needs echo
])
def test_what_is_truly_unknown_or_unsupported_is_refused_naming_it(server, body, param):
    status, err, _ = _post(server, "/v1/completions", body)
    assert status == 400 and err["error"]["param"] == param, err


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": 3}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"continue_final_message": True}, "continue_final_message"),
])
def test_chat_refusals_name_the_field(server, extra, param):
    status, err, _ = _post(server, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "Hi"}], **extra})
    assert status == 400 and err["error"]["param"] == param, err


def test_continue_final_message_continues_the_assistant(server, llm):
    tok = _tokenizer()
    messages = [{"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A list is"}]
    status, body, _ = _post(server, "/v1/chat/completions", {
        "messages": messages, "max_tokens": 6, "temperature": 0,
        "continue_final_message": True, "add_generation_prompt": False})
    assert status == 200, body
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("A list is")
    ids = tok.encode(text, add_special_tokens=False)
    expected = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0))
    assert body["choices"][0]["message"]["content"] == expected[0].outputs[0].text


def test_text_parts_join_with_newlines(server):
    def prompt_tokens(content):
        status, body, _ = _post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert status == 200, body
        return body["usage"]["prompt_tokens"]

    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert prompt_tokens(parts) == prompt_tokens("one\ntwo")


# -- prompt scoring ---------------------------------------------------------------------


def _offline_prompt_logprobs(llm, ids):
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    return [None if e is None else e[t].logprob
            for e, t in zip(out[0].prompt_logprobs, ids, strict=True)]


def test_echo_logprobs_score_the_prompt_like_the_engine_and_hf(client, llm):
    from transformers import AutoModelForCausalLM

    from raysvc.models.builtin import path

    tok = _tokenizer()
    ids = tok.encode(PROMPT)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                  echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    engine = _offline_prompt_logprobs(llm, ids)
    for got, want in zip(lp.token_logprobs[1:len(ids)], engine[1:], strict=True):
        assert abs(got - want) < 1e-4
    # and the reference: HF's own log-softmax over the same checkpoint (bf16 here)
    model = AutoModelForCausalLM.from_pretrained(path("tiny")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()
    hf = torch.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    for got, want in zip(lp.token_logprobs[1:len(ids)], hf.tolist(), strict=True):
        assert abs(got - want) < 0.1  # bf16 matmuls in a different order
    assert sum(abs(g - w) for g, w in zip(lp.token_logprobs[1:len(ids)], hf.tolist(),
                                          strict=True)) / (len(ids) - 1) < 0.03


def test_max_tokens_0_with_echo_scores_only(server, llm):
    tok = _tokenizer()
    ids = tok.encode(PROMPT)
    status, body, _ = _post(server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and body["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    engine = _offline_prompt_logprobs(llm, ids)
    assert all(abs(a - b) < 1e-4 for a, b in zip(choice["logprobs"]["token_logprobs"][1:],
                                                  engine[1:], strict=True))


def test_lm_eval_harness_loglikelihood_request(server, llm):
    """lm-eval-harness's local-completions log-likelihood request: context + continuation
    as one prompt, echo, logprobs=1, max_tokens=1; it sums the continuation's token
    logprobs and checks each is the top choice (is_greedy)."""
    tok = _tokenizer()
    context, continuation = tok.encode("The list type"), tok.encode(" is a sequence")
    ids = context + continuation
    status, body, _ = _post(server, "/v1/completions", {
        "model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1,
        "seed": 1234, "echo": True})
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    cont = lp["token_logprobs"][len(context):len(ids)]
    engine = _offline_prompt_logprobs(llm, ids)[len(context):]
    assert math.isclose(sum(cont), sum(engine), abs_tol=1e-3)
    tops = lp["top_logprobs"][len(context):len(ids)]
    greedy = all(max(t.values()) <= lp_ + 1e-6 for t, lp_ in zip(tops, cont, strict=True))
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    ranks = [out[0].prompt_logprobs[pos][ids[pos]].rank for pos in range(len(context),
                                                                        len(ids))]
    assert greedy == all(rank == 1 for rank in ranks)  # lm-eval's is_greedy, both ways


def test_vllm_prompt_logprobs_field(server, llm):
    tok = _tokenizer()
    ids = tok.encode(PROMPT)
    status, body, _ = _post(server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2})
    assert status == 200, body
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    engine = _offline_prompt_logprobs(llm, ids)
    for pos in range(1, len(ids)):
        entry = entries[pos]
        assert abs(entry[str(ids[pos])]["logprob"] - engine[pos]) < 1e-4
        assert len(entry) <= 3  # the token and its 2 best alternatives


# -- EOS, usage -------------------------------------------------------------------------


def test_eos_reports_stop_reason_null_and_no_eos_text(server, llm):
    tok = _tokenizer()
    prompts = [f"{w} is" for w in ("A list", "A tuple", "The module", "Python", "A set",
                                   "An integer", "The loop")]
    outs = llm.generate(prompts, SamplingParams(max_tokens=96, temperature=0))
    ended = [(p, o.outputs[0]) for p, o in zip(prompts, outs, strict=True)
             if o.outputs[0].finish_reason == "stop"]
    assert ended, "no prompt reached EOS within 96 tokens"
    prompt, out = ended[0]
    status, body, _ = _post(server, "/v1/completions", {
        "prompt": prompt, "max_tokens": 96, "temperature": 0, "skip_special_tokens": False})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None, choice
    eos = tok.decode(out.token_ids[-1:], skip_special_tokens=False)
    assert eos and eos not in choice["text"], (eos, choice["text"][-40:])
    assert body["usage"]["completion_tokens"] == len(out.token_ids)  # EOS counted


def test_continuous_usage_stats(server):
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps({
        "prompt": "x", "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode(),
        headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    counts = [e["usage"]["completion_tokens"] for e in events if e.get("choices")]
    assert counts and counts == sorted(counts) and counts[-1] == 6
    assert all(e.get("usage") for e in events)


# -- tools ------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def test_replayed_tool_conversation_is_accepted_and_rendered(client):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS,
                                       tool_choice="auto", max_tokens=4)
    assert r.choices[0].message.role == "assistant"
    plain = client.chat.completions.create(model="tiny", messages=history[:1], max_tokens=1)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 30  # tools + calls rendered
    tok = _tokenizer()
    text = tok.apply_chat_template(
        [history[0], {**history[1], "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, history[2]],
        tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_a_tool_message_without_its_call_id_is_refused(server):
    status, err, _ = _post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]})
    assert status == 400 and err["error"]["param"] == "messages[1].tool_call_id"


# -- ops endpoints, CORS ----------------------------------------------------------------


def test_tokenize_detokenize_version_ping(server):
    tok = _tokenizer()
    status, body, _ = _post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and body["tokens"] == tok.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    status, chat, _ = _post(server, "/tokenize", {"messages": messages})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    status, back, _ = _post(server, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == tok.decode(body["tokens"])
    status, err, _ = _post(server, "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err, _ = _post(server, "/tokenize", {})
    assert status == 400 and err["error"]["param"] == "prompt"
    with urllib.request.urlopen(server.url + "/version", timeout=30) as r:
        assert json.loads(r.read())["version"]
    for method in ("GET", "POST"):
        req = urllib.request.Request(server.url + "/ping", method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200


def test_cors_preflight(server):
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS",
                                 headers={"Origin": "https://app.example",
                                          "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
        assert "POST" in r.headers["Access-Control-Allow-Methods"]


# -- structured outputs and forced tool calls ---------------------------------------------

PET = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "age"],
       "properties": {"name": {"type": "string", "maxLength": 10},
                      "kind": {"enum": ["cat", "dog"]},
                      "age": {"type": "integer", "minimum": 0, "maximum": 30}}}
FORCED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "unit"],
        "properties": {"city": {"type": "string", "maxLength": 12},
                       "unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
]
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


def test_response_format_json_schema_and_json_object(client, llm):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    for seed in (None, 1, 2):
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=80, response_format=fmt, seed=seed,
            temperature=0 if seed is None else 1.0)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    # any object: the tiny model opens a key it never closes (so no json.loads here; the
    # engine's tests parse finished objects): the text is the offline engine's, constrained
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40,
                                       temperature=0, response_format={"type": "json_object"})
    ids = _tokenizer().apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected = llm.generate(ids, SamplingParams(max_tokens=40, temperature=0, structured_outputs={
        "json_object": True}))[0].outputs[0].text
    assert r.choices[0].message.content == expected and expected.startswith('{"')
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80,
                                            temperature=0, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PET)


def test_twenty_json_schemas_through_the_client(client):
    """The engine tests' 20 schemas (nested objects, enums, arrays, anyOf, ...), each as
    `response_format` json_schema with the openai client: the answers validate."""
    import jsonschema
    from test_structured_outputs import SCHEMAS

    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Answer {i} as JSON."}],
            max_tokens=100, temperature=0, response_format={
                "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                       "strict": True}})
        assert r.choices[0].finish_reason == "stop", (schema, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def _validate_call(call) -> None:
    import jsonschema

    schema = next(t["function"]["parameters"] for t in FORCED_TOOLS
                  if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_choice_required_and_named_give_calls_that_validate(client):
    ask = [{"role": "user", "content": "What is the weather in Oslo, and what is 2 + 3?"}]
    for seed in (4, 5):  # (greedy, the tiny model calls add() until its context is full)
        r = client.chat.completions.create(
            model="tiny", messages=ask, tools=FORCED_TOOLS, tool_choice="required",
            max_tokens=150, seed=seed, temperature=1.0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            _validate_call(call)
    r = client.chat.completions.create(
        model="tiny", messages=ask, tools=FORCED_TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "add" and r.choices[0].message.content is None
    _validate_call(call)
    one = client.chat.completions.create(
        model="tiny", messages=ask, tools=FORCED_TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=150, temperature=0)
    assert len(one.choices[0].message.tool_calls) == 1
    # streamed: the calls arrive as delta.tool_calls, as OpenAI sends them
    chunks = list(client.chat.completions.create(
        model="tiny", messages=ask, tools=FORCED_TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id
    assert len(deltas) > 3 and all(d.index == 0 and d.id is None for d in deltas[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    args = "".join(d.function.arguments or "" for d in deltas)  # fragments, as OpenAI
    _validate_call(type("Call", (), {"function": type("F", (), {
        "name": "get_weather", "arguments": args})})())
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_guided_fields_and_logit_bias_on_completions(client, llm):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": "[0-9]{2}-[a-z]{3}"})
    assert re.fullmatch("[0-9]{2}-[a-z]{3}", r.choices[0].text), r.choices[0].text
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert r.choices[0].text in ("alpha", "beta")
    bias = {"42": 7.5, "9": -100}
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  logit_bias=bias, extra_body={"ignore_eos": True})
    expected = llm.generate(PROMPT, SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True,
        logit_bias={int(k): v for k, v in bias.items()}))[0].outputs[0].text
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                                ignore_eos=True))[0].outputs[0].text
    assert r.choices[0].text == expected != plain
