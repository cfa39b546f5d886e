"""From a validated OpenAI request to what the cluster runs: token ids and engine params.

Everything that can be wrong with a request's content (as opposed to its JSON shape) is
caught here, before the request takes a place in any queue: unknown model, prompt too
long for the context, `max_tokens` beyond it, `n` above the limit, token ids outside the
vocabulary, roles the chat template does not know. Each raises a 400 (404 for the model)
that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from raysvc.serve.detokenizer import SampleText
from raysvc.serve.errors import APIError, bad_request, from_validation_error
from raysvc.serve.schema import ChatCompletionRequest, CompletionRequest, NamedToolChoice

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(slots=True)
class ModelFacts:
    """What the ingress must know about the served model (from the workers and tokenizer)."""

    name: str
    max_model_len: int
    vocab_size: int
    max_n: int = 16
    max_prompts: int = 64
    trust_request_chat_template: bool = False  # vLLM's --trust-request-chat-template
    tool_parser: str = "hermes"  # how this model writes tool calls (serve/tool_parsers.py)
    limits: RequestLimits = field(default_factory=lambda: RequestLimits())
    # LoRA adapters served on this base model: the name a request's `model` gives -> its
    # directory (`--lora-modules`)
    loras: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RequestLimits:
    """What one request may cost beyond its tokens (ServeArgs / CLI knobs of the same
    names): every stop string is searched after every token of every sample, every bad
    word checked, every bias applied, every grammar compiled. Past a limit: a 400 naming
    the field."""

    max_stop_strings: int = 16
    max_stop_string_length: int = 256  # characters
    max_bad_words: int = 64
    max_logit_bias: int = 300  # entries
    max_structured_output_bytes: int = 65536  # the schema / regex / grammar / choices
    max_logprobs: int = 20  # vLLM's --max-logprobs (top alternatives per token)

@dataclass(slots=True)
class Plan:
    prompts: list[list[int]]
    prompt_texts: list[str]  # for echo
    engine_params: dict[str, Any]
    samples: list[list[SampleText]]
    score_only: bool = False  # max_tokens 0: the prompt's logprobs, no completion
    echo_logprobs: bool = False  # echo + logprobs: the prompt's tokens lead the logprobs
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field, as asked
    priority: int = 0  # lower first, in the router's queue and the engine's
    tenant: str = ""  # the `user` field: fair shares among tenants under overload


def check_model(requested: str | None, facts: ModelFacts) -> str | None:
    """The LoRA adapter `requested` names (None: the base model); 404 in OpenAI's shape
    for a model this server does not serve."""
    if requested is None or requested == facts.name:
        return None
    if requested in facts.loras:
        return requested
    served = ", ".join(f"`{n}`" for n in [facts.name, *sorted(facts.loras)])
    raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                        f"{served}", param="model", code="model_not_found")


def completion_prompts(req: CompletionRequest, tokenizer, facts: ModelFacts) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [tokenizer.encode(p)]
    elif not p:
        raise bad_request("prompt: is empty", param="prompt")
    elif isinstance(p[0], str):
        prompts = [tokenizer.encode(text) for text in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(ids) for ids in p]
    if len(prompts) > facts.max_prompts:
        raise bad_request(f"prompt: {len(prompts)} prompts in one request; the limit is "
                          f"{facts.max_prompts}", param="prompt")
    for ids in prompts:
        if not ids:
            raise bad_request("prompt: is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < facts.vocab_size]
        if bad:
            raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary "
                              f"[0, {facts.vocab_size})", param="prompt")
    return prompts


def chat_prompt(req: ChatCompletionRequest, tokenizer, facts: ModelFacts | None = None
                ) -> list[int]:
    for i, message in enumerate(req.messages):
        if message.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role: unknown role {message.role!r}; expected "
                              f"one of {', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
        if message.role == "tool" and not message.tool_call_id:
            raise bad_request(f"messages[{i}].tool_call_id: a tool message answers a call; "
                              f"name it", param=f"messages[{i}].tool_call_id")
    template = None
    if req.chat_template is not None:
        if not (facts and facts.trust_request_chat_template):
            raise bad_request("chat_template: this server does not take chat templates from "
                              "requests (raysvc serve --trust-request-chat-template)",
                              param="chat_template")
        template = req.chat_template
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("messages: this model has no chat template; use /v1/completions",
                          param="messages")
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in ("messages", "tools", "tokenize", "chat_template"):
        if reserved in kwargs:
            raise bad_request(f"chat_template_kwargs.{reserved}: set by the request itself",
                              param=f"chat_template_kwargs.{reserved}")
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tokenizer.apply_chat_template(
            [_template_message(m) for m in req.messages], tools=_tool_dicts(tools),
            chat_template=template, tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, **kwargs)
    except Exception as e:  # a template that raises on this conversation
        raise bad_request(f"messages: the chat template failed: {e}", param="messages") from e
    return tokenizer.encode(text, add_special_tokens=False)


def _tool_dicts(functions: list[dict] | None) -> list[dict] | None:
    """Tools as HF chat templates take them: {"type": "function", "function": {...}}."""
    return None if functions is None else [{"type": "function", "function": f}
                                           for f in functions]


def _template_message(m) -> dict[str, Any]:
    """A message as chat templates read it (vLLM's conventions): text content, the name if
    any, an assistant's tool calls with their arguments as objects, a tool's call id."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                arguments: Any = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def plan(req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
         tokenizer, facts: ModelFacts, keep_special_tokens: bool = False) -> Plan:
    """Check lengths and limits; build engine params and one SampleText per choice.
    `keep_special_tokens`: decode them into the text (tool-call markers such as Mistral's
    [TOOL_CALLS] are special tokens), as vLLM does when it parses tool calls."""
    chat = isinstance(req, ChatCompletionRequest)
    field = "messages" if chat else "prompt"
    if req.n > facts.max_n:
        raise bad_request(f"n: {req.n} is above this server's limit of {facts.max_n}",
                          param="n")
    longest = max(len(p) for p in prompts)
    if longest >= facts.max_model_len:
        raise bad_request(f"{field}: {longest} tokens leave no room to generate: this "
                          f"model's context is {facts.max_model_len} tokens", param=field,
                          code="context_length_exceeded")
    max_tokens = req.max_completion_tokens or req.max_tokens if chat else req.max_tokens
    score_only = max_tokens == 0  # the engine generates one token, which is not reported
    max_tokens = 1 if score_only else max_tokens
    room = facts.max_model_len - longest
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)
    elif max_tokens > room:
        raise bad_request(f"max_tokens: {longest} prompt tokens + {max_tokens} max_tokens "
                          f"exceed this model's context of {facts.max_model_len} tokens",
                          param="max_completion_tokens" if chat and req.max_completion_tokens
                          else "max_tokens", code="context_length_exceeded")
    echo_logprobs = False
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
        echo_logprobs = req.echo and logprobs is not None
    limit = facts.limits.max_logprobs
    for name, asked in (("top_logprobs" if chat else "logprobs", logprobs),
                        ("prompt_logprobs", req.prompt_logprobs)):
        if asked is not None and asked > limit:
            raise bad_request(f"{name}: {asked} alternatives per token; this server allows "
                              f"at most {limit} (--max-logprobs)", param=name)
    prompt_top = [x for x in (req.prompt_logprobs, logprobs if echo_logprobs else None)
                  if x is not None]
    params: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids or [], logprobs=logprobs,
        prompt_logprobs=max(prompt_top) if prompt_top else None)
    for name in ("top_k", "min_p", "repetition_penalty", "allowed_token_ids"):
        if getattr(req, name) is not None:
            params[name] = getattr(req, name)
    if req.bad_words:
        params["bad_words"] = req.bad_words
    if req.logit_bias:
        params["logit_bias"] = _logit_bias(req.logit_bias, facts.vocab_size)
    for name in ("allowed_token_ids", "stop_token_ids"):
        bad = [t for t in getattr(req, name) or () if not 0 <= t < facts.vocab_size]
        if bad:
            raise bad_request(f"{name}: token id {bad[0]} is outside the vocabulary "
                              f"[0, {facts.vocab_size})", param=name)
    constraint = structured_outputs(req, facts.limits.max_structured_output_bytes)
    if constraint is not None:
        params["structured_outputs"] = constraint
    lora = check_model(req.model, facts)
    if lora is not None:
        params["lora_name"] = lora
    _check_engine_params(params)
    stops = req.stop_list()
    _check_costs(req, stops, facts.limits)
    skip = req.skip_special_tokens and not keep_special_tokens
    samples = [[SampleText(tokenizer, ids, stops, req.include_stop_str_in_output, skip,
                           req.min_tokens) for _ in range(req.n)]
               for ids in prompts]
    texts = [tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens)
             for ids in prompts] if getattr(req, "echo", False) else [""] * len(prompts)
    return Plan(prompts, texts, params, samples, score_only, echo_logprobs,
                req.prompt_logprobs, req.priority, req.user or "")


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings)."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias: key {key!r} is not a token id",
                              param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias: token id {token} is outside the vocabulary "
                              f"[0, {vocab_size})", param="logit_bias")
        out[token] = value
    return out


def required_tool_schema(tools: list, parallel: bool | None) -> dict[str, Any]:
    """`tool_choice: "required"`: a JSON array of calls, each naming one of the tools with
    arguments that validate against that tool's parameters (vLLM's shape)."""
    calls = [{"type": "object", "properties": {
        "name": {"type": "string", "enum": [t.function.name]},
        "parameters": t.function.parameters or {"type": "object"}},
        "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def _check_costs(req, stops: list[str], limits: RequestLimits) -> None:
    if len(stops) > limits.max_stop_strings:
        raise bad_request(f"stop: {len(stops)} stop strings; this server allows at most "
                          f"{limits.max_stop_strings}", param="stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_string_length:
        raise bad_request(f"stop: a stop string of {longest} characters; this server allows "
                          f"at most {limits.max_stop_string_length}", param="stop")
    words = req.bad_words or []
    if len(words) > limits.max_bad_words:
        raise bad_request(f"bad_words: {len(words)} words; this server allows at most "
                          f"{limits.max_bad_words}", param="bad_words")
    if any(len(w) > limits.max_stop_string_length for w in words):
        raise bad_request(f"bad_words: a word longer than {limits.max_stop_string_length} "
                          f"characters", param="bad_words")
    if len(req.logit_bias or {}) > limits.max_logit_bias:
        raise bad_request(f"logit_bias: {len(req.logit_bias)} entries; this server allows "
                          f"at most {limits.max_logit_bias}", param="logit_bias")


def structured_outputs(req: CompletionRequest | ChatCompletionRequest,
                       max_bytes: int = 65536
                       ) -> dict | None:
    """The request's one output constraint, from whichever field carries it; 400 naming
    the field when it is malformed, larger than `max_bytes` (compiling costs with its
    size), or when two fields each carry one."""
    from raysvc.engine.structured_output import StructuredOutputsParams, check_syntax

    found: list[tuple[str, Any]] = []
    if req.structured_outputs is not None:
        found.append(("structured_outputs", req.structured_outputs))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            found.append((name, {key: getattr(req, name)}))
    if isinstance(req, ChatCompletionRequest):
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            found.append(("response_format", {"json": fmt.json_schema.json_schema}))
        if req.tool_choice == "required":
            found.append(("tool_choice", {"json": required_tool_schema(
                req.tools, req.parallel_tool_calls)}))
        elif isinstance(req.tool_choice, NamedToolChoice):
            tool = next(t for t in req.tools if t.function.name == req.tool_choice.function.name)
            found.append(("tool_choice", {"json": tool.function.parameters
                                          or {"type": "object"}}))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"{found[1][0]}: only one output constraint per request (it comes "
                          f"with {found[0][0]})", param=found[1][0])
    field, value = found[0]
    size = len(json.dumps(value, default=str))
    if size > max_bytes:
        raise bad_request(f"{field}: {size} bytes of constraint; this server allows at most "
                          f"{max_bytes}", param=field)
    try:
        constraint = StructuredOutputsParams.model_validate(value)
        check_syntax(constraint)
    except ValidationError as e:
        raise bad_request(f"{field}: {e.errors()[0]['msg']}", param=field) from e
    except ValueError as e:
        where = f"{field}.{constraint.kind}" if field == "structured_outputs" else field
        raise bad_request(f"{where}: {e}", param=field) from e
    return constraint.model_dump(by_alias=True, exclude_none=True)


def _check_engine_params(params: dict[str, Any]) -> None:
    """The engine's own SamplingParams check, here, so a bad value never reaches a worker."""
    from raysvc.engine.sampling_params import SamplingParams

    try:
        SamplingParams(**params)
    except ValidationError as e:
        raise from_validation_error(e) from e
