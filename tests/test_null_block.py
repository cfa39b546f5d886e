"""[hot-path] The null block: one KV block past the block manager's range that padding
points at (block-table entries past a sequence's length; padded rows of a batch). The
block manager never hands it out, and nothing ever writes it: after a workload of
uneven lengths, prefix hits, preemption and speculation, it is still all zeros."""

from __future__ import annotations

import torch

from raysvc import LLM, SamplingParams
from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
from raysvc.engine.sequence import Request


def test_padding_points_at_the_null_block_which_stays_empty():
    llm = LLM(num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=64, dtype="float32",
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    engine = llm.engine
    cache, bm = engine.runner.kv_cache, engine.block_manager
    null = cache.null_block
    assert null == bm.num_blocks and cache.data.shape[2] == bm.num_blocks + 1
    prompts = [[5, 6, 7] * k for k in (1, 7, 20)] + [[5, 6, 7] * 7 + [9]]  # shared prefix
    llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert engine.stats()["num_preemptions"] > 0  # 12 blocks: the pool ran out
    assert torch.count_nonzero(cache.data[:, :, null]) == 0
    # a batch of uneven block tables: the short one is padded with the null block
    short = Request("a", None, [1] * 5, SamplingParams(), ()).seqs[0]
    long = Request("b", None, [1] * 60, SamplingParams(), ()).seqs[0]
    for seq in (short, long):
        bm.allocate_slots(seq, seq.num_tokens)
    try:
        assert null not in short.block_table + long.block_table
        _, _, meta = engine.runner.device_inputs(engine.runner.prepare(SchedulerOutput(
            [ScheduledSeq(short, 5), ScheduledSeq(long, 60)])))
        row = meta.block_tables[0].tolist()
        assert row[:len(short.block_table)] == short.block_table
        assert set(row[len(short.block_table):]) == {null}
    finally:
        bm.free(short)
        bm.free(long)
