"""Cross-worker prefix reuse, the worker's side: pull a prefix's KV from the worker that
holds it instead of recomputing it, when that is faster.

The router sees every worker's cached block hashes (KV events). When it places a request
on worker B while worker A holds a longer prefix of its prompt, the ticket says so; B then
asks A for those blocks (`LLMWorker.export_kv`: A's engine copies them between two steps
into one buffer that Ray's object store hands over) and imports them into its own prefix
cache before the request starts, so the request's prefill begins after them. A pull that
fails or takes longer than `timeout_s` is dropped: the request recomputes the prefix, as
it would have without the fabric. Concurrent requests of one prefix share one pull.

`KVCostModel` is what the router weighs a pull with: this worker's prefill rate (tokens/s,
timed at start-up with one forward pass) against the rate KV bytes arrive (timed at
start-up with a buffer's copies and serialization, then refined by every pull) plus a
fixed cost per pull (the two Ray calls and the engine-thread hops).

Live migration takes the same road the other way round: a draining worker's running
sequences leave its engine with their KV (`LLMWorker.migrate`), which it holds until the
worker each continuation lands on takes it (`KVPuller.take`); a take that fails leaves
the continuation to recompute, as a plain hand-over would.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class KVCostModel:
    block_size: int
    bytes_per_block: int
    prefill_tokens_per_s: float
    kv_bytes_per_s: float
    pull_overhead_s: float = 0.005

    def pull_s(self, blocks: int) -> float:
        return self.pull_overhead_s + blocks * self.bytes_per_block / self.kv_bytes_per_s

    def recompute_s(self, blocks: int) -> float:
        return blocks * self.block_size / self.prefill_tokens_per_s

    def worth(self, blocks: int, margin: float = 0.8) -> bool:
        """Is pulling `blocks` clearly faster than recomputing them?"""
        return blocks > 0 and self.pull_s(blocks) < margin * self.recompute_s(blocks)


def measure_cost_model(engine: Any) -> KVCostModel:
    """Time one prefill forward pass and one KV buffer's transfer copies (device -> host,
    serialized as Ray does, host -> device) on this worker: the start-up estimates."""
    import torch

    from raysvc.engine.sampling_params import SamplingParams
    from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
    from raysvc.engine.sequence import Request

    llm = engine.engine if hasattr(engine, "engine") else engine
    data = llm.runner.kv_cache.data
    bytes_per_block = data[:, :, 0].numel() * data.element_size()
    n = max(min(256, llm.config.max_num_batched_tokens, llm.max_model_len - 1), 1)
    bm, runner = llm.block_manager, llm.runner
    rate = 0.0
    for _ in range(2):  # the first warms up
        seq = Request("kv-cost", None, [0] * n, SamplingParams(), ()).seqs[0]
        if bm.allocate_slots(seq, n) is None:
            break
        try:
            start = time.perf_counter()
            runner.execute(runner.prepare(SchedulerOutput([ScheduledSeq(seq, n)]), [n - 1]))
            if data.device.type == "cuda":
                torch.cuda.synchronize(data.device)
            rate = n / max(time.perf_counter() - start, 1e-6)
        finally:
            bm.free(seq)
    # a transfer's copies: device -> host buffer, serialized (as Ray does into its object
    # store) and read back, host -> device; the first real pulls refine this
    blocks = max(min(64, bm.num_blocks), 1)
    buf = data[:, :, :blocks].contiguous()
    start = time.perf_counter()
    host = pickle.loads(pickle.dumps(buf.cpu().view(torch.uint8).numpy(), protocol=5))
    data[:, :, :blocks].copy_(torch.from_numpy(host).view(data.dtype).view(buf.shape)
                              .to(data.device))
    kv_rate = blocks * bytes_per_block / max(time.perf_counter() - start, 1e-6)
    return KVCostModel(llm.config.block_size, bytes_per_block, rate or 1e4, kv_rate)


class KVPuller:
    """Pulls for one worker; counts what they did (reported in its load reports)."""

    def __init__(self, engine: Any, cost: KVCostModel, timeout_s: float = 10.0) -> None:
        self.engine = engine  # the worker's AsyncEngine
        self.cost = cost
        self.timeout_s = timeout_s
        self._inflight: dict[bytes, asyncio.Task] = {}  # last hash of a chain -> its pull
        self.pulls = 0
        self.blocks = 0  # imported (not recomputed)
        self.bytes = 0
        self.seconds = 0.0
        self.failures = 0
        self.migrations_in = 0  # migrated sequences' KV taken
        self.migration_failures = 0

    async def take(self, source: Any, request_id: str):
        """A migrated request's `SequenceKV` from the draining worker holding it, checked
        for this engine; None (the continuation recomputes) if it is gone or unusable."""
        from raysvc.engine.kv_transfer import check_fingerprint

        try:
            kv = await asyncio.wait_for(source.take_migrated.remote(request_id),
                                        self.timeout_s)
            if kv is None:
                raise LookupError("the draining worker no longer holds it")
            check_fingerprint(self.engine.engine, kv.fingerprint, "resume_kv")
        except Exception as e:
            self.migration_failures += 1
            logger.warning("taking %s's migrated KV failed (%r); recomputing it", request_id, e)
            return None
        self.migrations_in += 1
        return kv

    async def pull(self, source: Any, block_hashes: list[bytes]) -> int:
        """Import what `source` holds of the chain; blocks imported (0 if it failed)."""
        if not block_hashes:
            return 0
        key = block_hashes[-1]
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.ensure_future(self._pull(source, block_hashes))
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _pull(self, source: Any, block_hashes: list[bytes]) -> int:
        start = time.perf_counter()
        try:
            kv = await asyncio.wait_for(source.export_kv.remote(block_hashes), self.timeout_s)
            if kv is None:  # evicted there meanwhile
                return 0
            n = await self.engine.import_kv(kv)
        except Exception as e:  # the source died, timed out, or refused: recompute
            self.failures += 1
            logger.warning("KV pull of %d blocks failed (%r); recomputing", len(block_hashes), e)
            return 0
        took = time.perf_counter() - start
        self.pulls += 1
        self.blocks += n
        self.bytes += kv.nbytes
        self.seconds += took
        if took > 0 and kv.nbytes:  # refine the transfer rate (moving average)
            self.cost.kv_bytes_per_s = 0.7 * self.cost.kv_bytes_per_s + 0.3 * kv.nbytes / took
        return n
