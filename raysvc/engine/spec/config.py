"""`speculative_config`, named as in vLLM: {"method", "model", "num_speculative_tokens", ...}."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SpeculativeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["draft_model", "ngram"]
    model: str | None = None  # draft checkpoint; draft_model default: the built-in "tiny-draft"
    num_speculative_tokens: int = Field(4, ge=1, le=16)  # the most proposals per step (k)
    prompt_lookup_max: int = Field(4, ge=1)  # n-gram sizes tried, longest first
    prompt_lookup_min: int = Field(1, ge=1)
    # Never speculate with this many decoding sequences or more (None: the cost model decides).
    disable_by_batch_size: int | None = Field(None, ge=1)
    adaptive: bool = True  # choose k (or off) from measured acceptance and step costs

    @field_validator("model", mode="before")
    @classmethod
    def _path_like(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("model: the ngram method uses no draft model")
        return self
