"""Per-request sampling parameters, named and defaulted as in vLLM.

A pydantic model, so every bad value is rejected with an error that names the field
(`pydantic.ValidationError` is a `ValueError`), unknown keywords included. Every field has a
range the sampler can compute with: no float is infinite or NaN, no integer overflows the
int64 tensors it becomes, and a seed plus a sample's index stays a valid generator seed.
The ingress runs this same check (a 400 naming the field), and `LLMEngine.add_request`
again for the Python API and batch jobs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raysvc.engine.structured_output import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_N = 128
# A torch generator's seed (vLLM's bounds); a sample's seed is seed + index, wrapped.
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
MAX_TOP_K = 2 ** 31 - 1  # any top_k >= the vocabulary keeps every token
# Below this a temperature divides logits into infinities (vLLM's _MAX_TEMP floor).
MIN_TEMPERATURE = 1e-2
MAX_PENALTY = 100.0


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int = Field(16, ge=1, le=2 ** 31 - 1)
    min_tokens: int = Field(0, ge=0, le=2 ** 31 - 1)
    temperature: float = Field(1.0, ge=0.0, le=1e4)  # (0, 0.01) is raised to 0.01
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K)  # 0 or -1: all tokens
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1.0 / MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)  # in the vocabulary: add_request
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Logprobs of each prompt token given the ones before it (top-N alternatives besides).
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    skip_special_tokens: bool = True
    # Tenant isolation for the prefix cache: requests with different salts share no block.
    cache_salt: str | None = None
    # The LoRA adapter this request runs with (None: the base model). Set by a
    # `LoRARequest` (the LLM API) or an OpenAI request's `model` naming an adapter; also a
    # prefix-cache key, like the salt.
    lora_name: str | None = None
    # vLLM's RequestOutputKind: each output holds everything so far ("cumulative"), only
    # what is new since the previous one ("delta": a stream costs O(length), not O(length^2)),
    # or only the finished request ("final_only").
    output_kind: Literal["cumulative", "delta", "final_only"] = "cumulative"
    # Logits processing before sampling (after the raw logprobs are taken, as in vLLM):
    # a bias added to given tokens' logits (OpenAI's -100..100), a whitelist of tokens,
    # words never to complete, and a grammar the output must follow.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None
    # The prompt's last N tokens are this request's own earlier output (a failover or
    # hand-over continuation): its grammar resumes after them instead of starting anew.
    continued_output_tokens: int = Field(0, ge=0)

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, v: float) -> float:
        return MIN_TEMPERATURE if 0.0 < v < MIN_TEMPERATURE else v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (v or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} for token {token} is outside [-100, 100]")
        return v or None

    @field_validator("allowed_token_ids")
    @classmethod
    def _some_allowed(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("must list at least one token id")
        return v

    @field_validator("bad_words")
    @classmethod
    def _no_empty_word(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise ValueError("bad words must be non-empty")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_processing(self) -> bool:
        """A position-independent change to the logits before sampling."""
        return self.logit_bias is not None or self.allowed_token_ids is not None

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
