"""Batch inference on Ray Data: `raysvc batch` for OpenAI batch files (`job.py`) and
`build_processor` for Ray Data pipelines (`processor.py`), both over `EngineStage` actors
that run each row through the HTTP endpoint's own request path."""

from raysvc.batch.processor import Processor, ProcessorConfig, build_processor

__all__ = ["Processor", "ProcessorConfig", "build_processor"]
