"""A Ray Data source that streams a JSONL file's lines, skipping those already done.

Ray Data's own JSON readers load a whole file in one read task (one block per file, split
after the read), so a file larger than a worker's memory cannot pass. This source cuts
the file into byte ranges, one read task each; a task seeks to its range, starts at the
first line that begins inside it and yields blocks of `rows_per_block` lines as it reads,
so memory stays at a block per task whatever the file's size. Lines whose custom_id is in
`skip` (sorted hashes, from the output a previous run wrote) are dropped right there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raysvc.batch.openai_file import id_hash

MIN_RANGE_BYTES = 1 << 20


class JsonlLines(Datasource):
    def __init__(self, path: str, skip=None, rows_per_block: int = 256) -> None:
        self.path = os.path.abspath(path)
        self.skip = skip  # ObjectRef of a sorted np.uint64 array, or None
        self.rows_per_block = rows_per_block

    def estimate_inmemory_data_size(self) -> int:
        return os.path.getsize(self.path)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        size = os.path.getsize(self.path)
        n = max(1, min(parallelism, size // MIN_RANGE_BYTES))
        bounds = [size * i // n for i in range(n + 1)]
        tasks = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            meta = BlockMetadata(num_rows=None, size_bytes=end - start,
                                 input_files=[self.path], exec_stats=None)
            path, skip, rows = self.path, self.skip, self.rows_per_block
            tasks.append(ReadTask(lambda p=path, a=start, b=end, s=skip, r=rows:
                                  _read_range(p, a, b, s, r), meta))
        return tasks


def _read_range(path: str, start: int, end: int, skip_ref, rows: int) -> Iterator:
    import pyarrow as pa
    import ray

    skip = ray.get(skip_ref) if skip_ref is not None else np.zeros(0, dtype=np.uint64)
    lines: list[str] = []
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before this range
        while f.tell() < end:
            raw = f.readline()
            if not raw:
                break
            if len(skip):
                h = np.uint64(id_hash(json.loads(raw)["custom_id"]))
                i = np.searchsorted(skip, h)
                if i < len(skip) and skip[i] == h:
                    continue
            lines.append(raw.decode("utf-8").lstrip("\ufeff").rstrip("\n"))
            if len(lines) >= rows:
                yield pa.table({"line": lines})
                lines = []
    if lines:
        yield pa.table({"line": lines})
