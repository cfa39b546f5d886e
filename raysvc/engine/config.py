"""Engine settings, named as in vLLM's `LLM(...)`, checked before anything is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from raysvc.models.attention import BACKENDS


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the built-in "tiny" model
    tokenizer: str | None = None  # defaults to the model directory
    # No tokenizer in the engine: prompts are token ids, outputs carry no text (a Serve
    # ingress tokenizes, detokenizes and applies stop strings itself).
    skip_tokenizer_init: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None  # KV byte budget (CPU default: 1 GiB)
    # host memory for prefix blocks evicted from the KV pool (raysvc.engine.host_tier):
    # None = 4 GiB on CUDA, off on CPU (the pool is host memory there); 0 = off
    kv_offload_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    attention_backend: str = "auto"  # auto | triton | torch
    enable_prefix_caching: bool = True
    # {"method": "draft_model" | "ngram", "model": PATH, "num_speculative_tokens": k, ...}
    speculative_config: dict | None = None
    # No CUDA graphs (on CUDA they replay decode and verification steps, and the draft
    # model's rounds): for debugging and for measuring what the graphs save.
    enforce_eager: bool = False
    seed: int = 0
    # A structured-output constraint that takes longer to compile is refused (ValueError
    # naming the field); the AsyncEngine compiles off its step thread, so no other
    # request waits meanwhile.
    grammar_compile_timeout_s: float = 10.0
    # Multi-LoRA (vLLM's names): adapters active in one step, the largest rank accepted,
    # adapters kept loaded in host memory (default: max_loras), and adapters known from
    # the start (name -> PEFT directory; more come with LoRARequests or at run time).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_modules: dict[str, str] | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown engine argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        for name in ("model", "tokenizer"):  # a pathlib.Path is as good as a str
            if isinstance(kwargs.get(name), os.PathLike):
                kwargs[name] = os.fspath(kwargs[name])
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")

        for name in ("skip_tokenizer_init", "enable_prefix_caching", "enforce_eager",
                     "enable_lora"):
            if not isinstance(getattr(self, name), bool):  # "no" would read as true
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        positive("block_size")
        if self.block_size & (self.block_size - 1) or self.block_size < 8:
            raise ValueError(f"block_size: must be a power of two >= 8, got {self.block_size}")
        positive("num_kv_blocks", allow_none=True)
        positive("kv_cache_memory_bytes", allow_none=True)
        offload = self.kv_offload_bytes
        if offload is not None and (isinstance(offload, bool) or not isinstance(offload, int)
                                    or offload < 0):
            raise ValueError(f"kv_offload_bytes: must be a non-negative integer, got "
                             f"{offload!r}")
        positive("max_num_seqs")
        positive("max_num_batched_tokens")
        positive("max_model_len", allow_none=True)
        positive("max_loras")
        positive("max_lora_rank")
        positive("max_cpu_loras", allow_none=True)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras: must be >= max_loras ({self.max_loras}), got "
                             f"{self.max_cpu_loras}")
        if self.lora_modules is not None:
            if not self.enable_lora:
                raise ValueError("lora_modules: adapters need enable_lora=True")
            if not isinstance(self.lora_modules, dict) or not all(
                    isinstance(k, str) and k and isinstance(v, str | os.PathLike)
                    for k, v in self.lora_modules.items()):
                raise ValueError("lora_modules: expected {name: directory}, got "
                                 f"{self.lora_modules!r}")
        timeout = self.grammar_compile_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"grammar_compile_timeout_s: must be a positive number of "
                             f"seconds, got {timeout!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.speculative_config is not None:
            from raysvc.engine.spec.config import SpeculativeConfig

            if not isinstance(self.speculative_config, dict):
                raise ValueError("speculative_config: expected a dict like "
                                 '{"method": "ngram", "num_speculative_tokens": 4}')
            try:
                SpeculativeConfig.model_validate(self.speculative_config)
            except ValueError as e:
                raise ValueError(f"speculative_config: {e}") from e
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"attention_backend: {self.attention_backend!r} is not one of {', '.join(BACKENDS)}"
            )
