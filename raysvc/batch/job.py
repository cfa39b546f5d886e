"""`raysvc batch INPUT OUTPUT`: an OpenAI batch file through an autoscaling pool of engines.

1. The input is checked line by line before any work: a line that is not a JSON object,
   lacks custom_id / method / url / body, or repeats a custom_id makes the job exit 2,
   naming the lines (the first 20), with nothing generated.
2. OUTPUT is opened for appending (`OutputFile`): a new job starts it; a rerun of the same
   job resumes, skipping the custom_ids already there; a rerun with another input, model
   or engine settings refuses unless `--overwrite`.
3. Ray Data streams the remaining lines (`JsonlLines`) through the engine actors
   (`EngineStage`, the processor's stage in "openai" mode) and back to this process, which
   appends each output line, flushed as it goes. Ray Data hands a batch back when all its
   rows are done, so batches are small (`--batch-size`, 16) and many run at once: a kill
   at any moment loses at most the batches in flight, which the next run redoes. Memory
   here holds a block, not the file. One job writes an OUTPUT at a time (a lock).
4. Progress on stderr: rows done / total, rows/s, output tokens/s, ETA, failed; then a
   summary line, and `--summary-json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

from raysvc.batch.openai_file import OutputFile, check_input

OBJECT_STORE_BUDGET = 128 << 20  # bytes of rows in flight through the pipeline


@dataclass
class Summary:
    total: int = 0
    completed: int = 0  # rows answered 200 in this run
    failed: int = 0  # rows answered 4xx/5xx in this run (each has its output line)
    resumed: int = 0  # rows found done in OUTPUT and skipped
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0


class Progress:
    def __init__(self, total: int, resumed: int, stream=sys.stderr, every_s: float = 2.0):
        self.total, self.resumed, self.stream, self.every_s = total, resumed, stream, every_s
        self.start = self.last = time.monotonic()
        self.tty = stream.isatty()

    def update(self, s: Summary, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        done = s.completed + s.failed
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        left = self.total - self.resumed - done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        line = (f"raysvc batch: {done + self.resumed}/{self.total} rows "
                f"({100 * (done + self.resumed) / max(self.total, 1):.1f}%), {rate:.1f} rows/s, "
                f"{s.output_tokens / elapsed:.0f} output tok/s, ETA {eta}, failed {s.failed}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()


def run(args) -> int:
    from raysvc.batch.processor import ProcessorConfig

    check = check_input(args.input)
    if check.num_bad:
        for lineno, why in check.bad:
            print(f"{args.input}:{lineno}: {why}", file=sys.stderr)
        more = check.num_bad - len(check.bad)
        print(f"raysvc batch: error: {check.num_bad} bad line(s) in {args.input}"
              f"{f' ({more} more not shown)' if more else ''}; nothing was generated",
              file=sys.stderr)
        return 2
    config = ProcessorConfig(model=args.model, served_model_name=args.served_model_name,
                             engine_kwargs=args.engine, concurrency=args.concurrency,
                             batch_size=args.batch_size,
                             # Ray Data returns a batch's rows when all of them are done:
                             # small batches checkpoint often, and enough of them run at
                             # once to fill the engine's batch (max_num_seqs sequences)
                             max_concurrent_batches=max(8, math.ceil(
                                 args.engine.get("max_num_seqs", 256) / args.batch_size)),
                             num_gpus_per_worker=args.num_gpus_per_worker,
                             num_cpus_per_worker=args.worker_cpus,
                             torch_threads=args.worker_threads)
    meta = {"format": 1, "input_sha256": check.sha256, "model": args.model,
            "served_model_name": config.name(),
            "engine": json.loads(json.dumps(args.engine, sort_keys=True, default=str)),
            "created": int(os.stat(args.input).st_mtime)}
    out = OutputFile(args.output)
    try:
        done, meta = out.open(meta, args.overwrite)
        summary = Summary(total=check.total, resumed=len(done))
        start = time.monotonic()
        if summary.resumed < check.total:
            _process(args, config, done, meta["created"], out, summary)
        summary.seconds = round(time.monotonic() - start, 3)
    finally:
        out.close()
    print(f"raysvc batch: {summary.total} rows: {summary.completed} completed, "
          f"{summary.failed} failed, {summary.resumed} resumed; {summary.prompt_tokens} prompt "
          f"+ {summary.output_tokens} output tokens in {summary.seconds:.1f}s -> {args.output}",
          file=sys.stderr)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(asdict(summary), f, indent=1)
    return 0


def _process(args, config, done, created: int, out: OutputFile, summary: Summary) -> None:
    import ray
    from ray.data import DataContext

    from raysvc.batch.jsonl_source import JsonlLines
    from raysvc.batch.processor import engine_stage

    own_ray = not ray.is_initialized()
    if own_ray:
        if args.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=args.address, logging_level="warning")
        else:
            lo, hi = config.pool()
            cpus = max(os.cpu_count() or 1,
                       math.ceil(hi * config.num_cpus_per_worker) + 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     logging_level="warning")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours says rows, tokens, ETA and failures
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Rows wait for this process in Ray's object store, whose pages count in its RSS as it
    # reads them: a bounded buffer ahead of the writer keeps this process's memory flat
    # whatever the file's size (rows are small; engines, not buffers, set the pace).

    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=OBJECT_STORE_BUDGET)
    try:
        skip = ray.put(done) if len(done) else None
        # reading costs little CPU; a whole CPU per read task could leave the engine
        # actors' CPUs unplaceable on a small machine (Ray Data then waits forever)
        # Block size is the checkpoint's grain: Ray Data merges a read task's rows into
        # blocks of up to target_max_block_size (128 MiB by default) and an engine task
        # returns its whole input block at once, so with the default every row of a small
        # job would be written at its very end. Blocks of a batch or so write rows as
        # they finish; the driver keeps a few KB per block, so a large job's blocks grow
        # (to 1/64 of it, up to 4096 rows) to keep that flat.
        rows = min(max(config.batch_size, summary.total // 64), max(config.batch_size, 4096))
        ctx.target_max_block_size = max(
            4096, rows * os.path.getsize(args.input) // max(summary.total, 1))
        ds = ray.data.read_datasource(JsonlLines(args.input, skip, rows_per_block=rows),
                                      num_cpus=0.1)
        ds = engine_stage(ds, config, mode="openai", created=created)
        progress = Progress(summary.total, summary.resumed)
        print(f"raysvc batch: {summary.total - summary.resumed} row(s) to run "
              f"({summary.resumed} already in {args.output}); starting engine actor(s)...",
              file=sys.stderr, flush=True)
        with out.appender() as f:
            last_sync = time.monotonic()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for line, status, p_tok, o_tok in zip(batch["output"], batch["status_code"],
                                                      batch["prompt_tokens"],
                                                      batch["output_tokens"], strict=True):
                    f.write(str(line) + "\n")
                    if int(status) == 200:
                        summary.completed += 1
                    else:
                        summary.failed += 1
                    summary.prompt_tokens += int(p_tok)
                    summary.output_tokens += int(o_tok)
                f.flush()
                if time.monotonic() - last_sync > 5:
                    os.fsync(f.fileno())
                    last_sync = time.monotonic()
                progress.update(summary)
            os.fsync(f.fileno())
        if progress.tty:
            print(file=sys.stderr)
    finally:
        if own_ray:
            ray.shutdown()
