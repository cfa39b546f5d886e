"""raysvc: distributed LLM inference on Ray Serve."""

from raysvc.engine.async_engine import AsyncEngine
from raysvc.engine.outputs import CompletionOutput, Logprob, RequestOutput
from raysvc.engine.sampling_params import SamplingParams
from raysvc.llm import LLM

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
