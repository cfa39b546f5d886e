"""Structured outputs: a grammar decides which tokens may come next (xgrammar, as vLLM and
SGLang use it).

A request's constraint (`StructuredOutputsParams`: a JSON schema, any JSON object, a
regex, a choice of strings or an EBNF grammar) compiles once per distinct constraint
(cached) into a token-level automaton. Each sequence walks it with its own matcher: before
sampling, the matcher fills a bitmask of the tokens allowed next and the logits row is
masked with it; after sampling, the token is accepted. Once the grammar is complete only
the stop tokens remain allowed, so the sequence ends with a stop token.

Speculative decoding: a sequence's k proposals are walked through its matcher to mask
each of the k + 1 rows verification reads (the target's distribution after the mask is
what rejection sampling keeps), then rolled back; the tokens actually accepted are taken
afterwards, as any sampled token. A proposal the grammar refuses ends the walk: its row
and those after are never read, since verification stops at the first rejection.

Masks are filled on the host right after the forward pass is queued, so on a GPU they
are computed while the device runs the step.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

KINDS = {"json": "json_schema", "json_object": "json_object", "regex": "regex",
         "choice": "choice", "grammar": "grammar"}  # vLLM's key -> attribute


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF), as xgrammar reads it

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        given = [k for k, attr in KINDS.items() if getattr(self, attr) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice, grammar"
                             f" (got {', '.join(given) or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: must list at least one string")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, attr in KINDS.items() if getattr(self, attr) not in (None, False))

    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (the cache key)."""
        value = getattr(self, KINDS[self.kind])
        return self.kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _message(e: Exception) -> str:
    """xgrammar's error without its C++ source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)


def check_syntax(params: StructuredOutputsParams) -> None:
    """Parse the constraint without a tokenizer (an ingress's early 400): ValueError with
    xgrammar's reason when it is malformed."""
    import xgrammar as xgr

    try:
        _grammar(xgr, params)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(_message(e)) from e


def _grammar(xgr, params: StructuredOutputsParams):
    kind = params.kind
    if kind == "json":
        schema = params.json_schema
        schema = schema if isinstance(schema, str) else json.dumps(schema)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(params.regex)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c)
                                                               for c in params.choice))
    return xgr.Grammar.from_ebnf(params.grammar)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; the compiled grammars are
    cached by constraint, so a schema sent with every request compiles once."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...],
                 cache_size: int = 256) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: dict[tuple[str, str], Any] = {}
        self._cache_size = cache_size

    def compile(self, params: StructuredOutputsParams):
        key = params.key()
        compiled = self._cache.pop(key, None)  # re-inserted: most recently used last
        if compiled is None:
            try:
                compiled = self._compiler.compile_grammar(_grammar(self._xgr, params))
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"structured_outputs.{params.kind}: {_message(e)}") from e
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = compiled
        return compiled

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)  # rolls back any number of tokens

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, Any, list[int]]]) -> None:
        """Mask `logits` [rows, >= vocab] in place. Each entry: (first row, the sequence's
        matcher, its proposals): the first row gets the matcher's current mask, each
        following row the mask after the proposals before it."""
        bitmask = self._xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        indices = []
        for row, matcher, drafts in rows:
            walked = 0
            for j in range(len(drafts) + 1):
                matcher.fill_next_token_bitmask(bitmask, row + j)
                indices.append(row + j)
                if j == len(drafts) or not matcher.accept_token(drafts[j]):
                    break  # the rows after a refused proposal are never read
                walked += 1
            if walked:
                matcher.rollback(walked)
        self._xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size,
            indices=indices)
