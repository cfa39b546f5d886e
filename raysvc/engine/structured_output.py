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

Masks are filled on a host thread while the step's forward pass runs (beside the
model's threads on a CPU, beside the queued kernels on a GPU) and applied to the logits
when both are done.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
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
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self._bitmask: torch.Tensor | None = None  # [rows, vocab / 32] int32, reused
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="raysvc-grammar")
        self._cache: dict[tuple[str, str], Any] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache: compiled off the step thread, read on it

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar, from the cache or compiled now (thread-safe: AsyncEngine
        compiles on its own thread, with a time bound, before the request reaches the
        step thread, which then finds it here)."""
        key = params.key()
        with self._lock:
            compiled = self._cache.pop(key, None)  # re-inserted: most recently used last
            if compiled is not None:
                self._cache[key] = compiled
                return compiled
        try:
            compiled = self._compiler.compile_grammar(_grammar(self._xgr, params))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{params.kind}: {_message(e)}") from e
        with self._lock:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = compiled
        return compiled

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)  # rolls back any number of tokens

    def fill(self, num_rows: int, rows: list[tuple[int, Any, list[int]]]) -> Future:
        """Start filling the masks of a step's logits rows [num_rows] in the background, so
        that they are ready when its forward pass is (on a CPU it runs beside the model's
        threads; on a GPU beside the queued kernels). Each entry: (first row, the
        sequence's matcher, its proposals): the first row gets the matcher's current mask,
        each following row the mask after the proposals before it. `apply` takes the
        result; one step's fill at a time."""
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            size = max(num_rows, 2 * (0 if self._bitmask is None else self._bitmask.shape[0]))
            self._bitmask = self._xgr.allocate_token_bitmask(size, self.vocab_size)
        return self._filler.submit(self._fill, self._bitmask, rows)

    def _fill(self, bitmask: torch.Tensor, rows: list[tuple[int, Any, list[int]]]
              ) -> tuple[torch.Tensor, list[int]]:
        if not any(drafts for _, _, drafts in rows):  # plain decoding: one call for all
            indices = [row for row, _, _ in rows]
            self._batch.batch_fill_next_token_bitmask([m for _, m, _ in rows], bitmask,
                                                      indices)
            return bitmask, indices
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
        return bitmask, indices

    def apply(self, logits: torch.Tensor, filled: Future) -> None:
        """Mask `logits` [rows, >= vocab] in place with what `fill` computed."""
        bitmask, indices = filled.result()
        if logits.device.type == "cpu":
            _mask_on_host(logits, bitmask, indices, self.vocab_size)
        else:
            self._xgr.apply_token_bitmask_inplace(
                logits, bitmask[: logits.shape[0]].to(logits.device, non_blocking=True),
                vocab_size=self.vocab_size, indices=indices)


def _mask_on_host(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int],
                  vocab_size: int) -> None:
    """-inf where the bitmask has a 0, with numpy on the logits' bits (any float dtype):
    several times faster than xgrammar's CPU kernel."""
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1,
                            bitorder="little")[:, :vocab_size].view(np.bool_)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[logits.element_size()]
    values = logits[:, :vocab_size].view(ints).numpy()
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype).view(ints).item()
    if indices == list(range(values.shape[0])):
        values[~allowed[: values.shape[0]]] = neg_inf
    else:
        for i in indices:
            values[i][~allowed[i]] = neg_inf
