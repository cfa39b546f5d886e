"""`LLM`: offline batched generation, shaped like vLLM's so users feel at home."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from raysvc.engine.config import EngineConfig
from raysvc.engine.llm_engine import LLMEngine
from raysvc.engine.outputs import RequestOutput
from raysvc.engine.sampling_params import SamplingParams
from raysvc.models.lora import LoRARequest

Prompt = str | list[int]


class LLM:
    """Load a model once, then `generate` batches of prompts through the engine.

    >>> llm = LLM()  # the built-in "tiny" model on CPU
    >>> out = llm.generate(["The list type"], SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(self, model: str | None = None, *, proposer=None, **kwargs) -> None:
        """kwargs: EngineConfig fields. `proposer`: speculative proposals from outside the
        engine (e.g. `raysvc.cluster.draft_pool.DraftPoolProposer`), with a
        `speculative_config` that says how many."""
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs), proposer)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        prompts: a string, a list of strings, or a list of token-id lists.
        lora_request: one adapter for every prompt, or one (or None) per prompt; they run
        mixed in the same steps (needs `enable_lora=True`).
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = _per_prompt("sampling_params", sampling_params, SamplingParams, len(prompts))
        loras = _per_prompt("lora_request", lora_request, LoRARequest, len(prompts))

        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for request_id, prompt, p, lora in zip(ids, prompts, params, loras, strict=True):
                # only the finished outputs are wanted: no copy of the text so far each step
                p = (p or SamplingParams()).model_copy(update={"output_kind": "final_only"})
                self.engine.add_request(request_id, prompt, p, lora_request=lora)
                added.append(request_id)
        except ValueError:
            for request_id in added:
                self.engine.abort(request_id)
            raise

        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return [final[i] for i in ids]

    def stats(self) -> dict[str, int]:
        return self.engine.stats()


def _per_prompt(name: str, value, kind: type, n: int) -> list:
    """One value for every prompt (None or a single `kind`), or one per prompt."""
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} given for {n} prompts")
    return values
