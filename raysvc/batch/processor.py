"""`build_processor`: raysvc engines as a stage of a Ray Data pipeline.

Shaped like `ray.data.llm.build_processor` (which runs vLLM), so a pipeline moves over by
changing its config:

    from raysvc.batch import ProcessorConfig, build_processor

    processor = build_processor(
        ProcessorConfig(model="path/to/checkpoint", concurrency=(1, 4), batch_size=32,
                        engine_kwargs={"max_num_seqs": 128}),
        preprocess=lambda row: {"prompt": row["question"],
                                "sampling_params": {"max_tokens": 64, "temperature": 0}},
        postprocess=lambda row: {"question": row["question"],
                                 "answer": row["generated_text"]})
    ds = processor(ray.data.read_parquet("questions.parquet"))
    ds.write_parquet("answers/")

Rows after `preprocess` hold `prompt` (text, or token ids) or `messages` (chat), and
optional `sampling_params` (the OpenAI request fields: max_tokens, temperature, top_p,
stop, seed, ... and vLLM's extras). The stage adds `generated_text`, `num_input_tokens`,
`num_generated_tokens` and `error` (None, or why this row was refused: a bad row never
fails the job) and keeps the other columns for `postprocess`.

The engine stage is an actor pool (`concurrency`: N, which autoscales from 1 to N as
`ray.data.llm`'s does, or (min, max)); each actor owns one engine (one GPU each on a GPU
cluster) and keeps `max_concurrent_batches` batches in flight so its engine stays full.
Ray Data restarts a dead actor and retries its batches; a batch's rows come out once,
when its retry succeeds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ProcessorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # checkpoint directory; None: the built-in "tiny"
    served_model_name: str | None = None  # what requests may name as "model"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # EngineConfig fields
    concurrency: int | tuple[int, int] = 1
    batch_size: int = Field(32, ge=1)
    max_concurrent_batches: int = Field(8, ge=1)  # per actor: keeps its engine full
    num_gpus_per_worker: float | None = Field(None, ge=0)  # None: 1 on a GPU cluster
    num_cpus_per_worker: float = Field(1.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # None: int(num_cpus_per_worker)

    @field_validator("concurrency")
    @classmethod
    def _range(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"concurrency: need N >= 1 or (min, max) with 1 <= min <= max, "
                             f"got {v!r}")
        return v

    @field_validator("engine_kwargs")
    @classmethod
    def _engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        from raysvc.engine.config import EngineConfig

        EngineConfig.from_kwargs(**{k: x for k, x in v.items() if k != "model"})
        return v

    def name(self) -> str:
        return self.served_model_name or self.model or "tiny"

    def pool(self) -> tuple[int, int]:
        """(min, max) actors: N autoscales from 1 to N, as ray.data.llm's does."""
        return (1, self.concurrency) if isinstance(self.concurrency, int) else self.concurrency

    def gpus(self) -> float:
        if self.num_gpus_per_worker is not None:
            return self.num_gpus_per_worker
        import ray

        device = str(self.engine_kwargs.get("device", "auto"))
        on_gpu = device.startswith("cuda") or (
            device == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0))
        return 1.0 if on_gpu else 0.0


def engine_stage(ds, config: ProcessorConfig, mode: str, created: int = 0):
    """`ds` through an autoscaling pool of `EngineStage` actors."""
    import ray
    from ray.data import ActorPoolStrategy

    from raysvc.batch.quarantine import RowLedger
    from raysvc.batch.stage import EngineStage

    lo, hi = config.pool()
    gpus = config.gpus()
    # the rows that killed an engine, kept across the stage actors' restarts
    ledger = ray.remote(RowLedger).options(num_cpus=0, max_restarts=-1).remote()
    return ds.map_batches(
        EngineStage,
        fn_constructor_kwargs=dict(
            model=config.model, engine_kwargs=config.engine_kwargs, served_name=config.name(),
            mode=mode, created=created, ledger=ledger,
            torch_threads=config.torch_threads or max(int(config.num_cpus_per_worker), 1)),
        batch_size=config.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=lo, max_size=hi,
                                  max_concurrent_calls_per_actor=config.max_concurrent_batches,
                                  max_tasks_in_flight_per_actor=config.max_concurrent_batches),
        num_cpus=0 if gpus else config.num_cpus_per_worker, num_gpus=gpus)


class Processor:
    """`processor(ds) -> ds`: preprocess, the engine stage, postprocess (lazily)."""

    def __init__(self, config: ProcessorConfig, preprocess=None, postprocess=None) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess

    def __call__(self, ds):
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        ds = engine_stage(ds, self.config, mode="prompt")
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds


def build_processor(config: ProcessorConfig | dict, preprocess=None,
                    postprocess=None) -> Processor:
    if not isinstance(config, ProcessorConfig):
        config = ProcessorConfig(**config)
    return Processor(config, preprocess, postprocess)
