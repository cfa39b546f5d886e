"""From a validated OpenAI request to what the cluster runs: token ids and engine params.

Everything that can be wrong with a request's content (as opposed to its JSON shape) is
caught here, before the request takes a place in any queue: unknown model, prompt too
long for the context, `max_tokens` beyond it, `n` above the limit, token ids outside the
vocabulary, roles the chat template does not know. Each raises a 400 (404 for the model)
that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from raysvc.serve.detokenizer import SampleText
from raysvc.serve.errors import APIError, bad_request, from_validation_error
from raysvc.serve.schema import ChatCompletionRequest, CompletionRequest

CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(slots=True)
class ModelFacts:
    """What the ingress must know about the served model (from the workers and tokenizer)."""

    name: str
    max_model_len: int
    vocab_size: int
    max_n: int = 16
    max_prompts: int = 64


@dataclass(slots=True)
class Plan:
    prompts: list[list[int]]
    prompt_texts: list[str]  # for echo
    engine_params: dict[str, Any]
    samples: list[list[SampleText]]


def check_model(requested: str | None, facts: ModelFacts) -> None:
    if requested is not None and requested != facts.name:
        raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                            f"`{facts.name}`", param="model", code="model_not_found")


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


def chat_prompt(req: ChatCompletionRequest, tokenizer) -> list[int]:
    for i, message in enumerate(req.messages):
        if message.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role: unknown role {message.role!r}; expected "
                              f"one of {', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("messages: this model has no chat template; use /v1/completions",
                          param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=req.add_generation_prompt)
    except Exception as e:  # a template that raises on this conversation
        raise bad_request(f"messages: the chat template failed: {e}", param="messages") from e
    return tokenizer.encode(text, add_special_tokens=False)


def plan(req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
         tokenizer, facts: ModelFacts) -> Plan:
    """Check lengths and limits; build engine params and one SampleText per choice."""
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
    room = facts.max_model_len - longest
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)
    elif max_tokens > room:
        raise bad_request(f"max_tokens: {longest} prompt tokens + {max_tokens} max_tokens "
                          f"exceed this model's context of {facts.max_model_len} tokens",
                          param="max_completion_tokens" if chat and req.max_completion_tokens
                          else "max_tokens", code="context_length_exceeded")
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    params: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids or [], logprobs=logprobs)
    for name in ("top_k", "min_p", "repetition_penalty"):
        if getattr(req, name) is not None:
            params[name] = getattr(req, name)
    _check_engine_params(params)
    stops = req.stop_list()
    samples = [[SampleText(tokenizer, ids, stops, req.include_stop_str_in_output,
                           req.skip_special_tokens, req.min_tokens) for _ in range(req.n)]
               for ids in prompts]
    texts = [tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens)
             for ids in prompts] if getattr(req, "echo", False) else [""] * len(prompts)
    return Plan(prompts, texts, params, samples)


def _check_engine_params(params: dict[str, Any]) -> None:
    """The engine's own SamplingParams check, here, so a bad value never reaches a worker."""
    from raysvc.engine.sampling_params import SamplingParams

    try:
        SamplingParams(**params)
    except ValidationError as e:
        raise from_validation_error(e) from e
