"""raysvc: distributed LLM inference on Ray Serve.

The public names are imported lazily, so light modules (`raysvc.block_hash`, used by the
router and the ingress) import without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "raysvc.llm",
    "AsyncEngine": "raysvc.engine.async_engine",
    "SamplingParams": "raysvc.engine.sampling_params",
    "RequestOutput": "raysvc.engine.outputs",
    "CompletionOutput": "raysvc.engine.outputs",
    "Logprob": "raysvc.engine.outputs",
    "LoRARequest": "raysvc.models.lora",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raysvc' has no attribute {name!r}")
