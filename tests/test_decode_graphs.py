"""Decode graphs: the static-buffer decode step equals the plain model runner's.

On CPU the buffers run eagerly (padding rows, block tables, slots: the logic a graph
replays); on CUDA the captured graphs replay it, and speculative greedy output with the
graphed draft equals plain decoding.
"""

from __future__ import annotations

import pytest
import torch

from raysvc.engine.config import EngineConfig
from raysvc.engine.decode_graphs import DecodeGraphs
from raysvc.engine.llm_engine import LLMEngine
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
from raysvc.engine.sequence import Request

CUDA = torch.cuda.is_available()


def _decoding_seqs(engine: LLMEngine, lengths: list[int]):
    """Sequences with their prompts' KV in the pool and one new token to decode each."""
    seqs = []
    for i, n in enumerate(lengths):
        seq = Request(f"r{i}", None, [(7 * i + j) % 50 + 3 for j in range(n)], SamplingParams(),
                      ()).seqs[0]
        engine.block_manager.allocate(seq, n)
        engine.runner.execute(SchedulerOutput([ScheduledSeq(seq, n)]), [n - 1])
        seq.num_computed_tokens = n
        seq.token_ids.append(11 + i)
        engine.block_manager.allocate(seq, 1)
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("lengths", [[5], [3, 17, 16], [1, 40, 2, 9, 33]])
def test_static_buffers_equal_the_plain_runner(make_checkpoint, lengths):
    path, _ = make_checkpoint("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=64,
                                    block_size=8))
    graphs = DecodeGraphs(engine.runner.model, engine.runner.kv_cache, engine.runner.backend,
                          max_seqs=5, max_blocks_per_seq=8, capture=False)
    assert graphs.sizes == [1, 2, 4, 5]
    seqs = _decoding_seqs(engine, lengths)
    batch = SchedulerOutput([ScheduledSeq(s, 1) for s in seqs])
    assert graphs.fits(batch)
    expected = engine.runner.execute(batch, list(range(len(seqs))))
    got = graphs.execute(batch)  # writes the same K/V to the same slots again
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # padding rows wrote nowhere: every sequence's next step still agrees
    for s in seqs:
        s.num_computed_tokens += 1
        s.token_ids.append(5)
        engine.block_manager.allocate(s, 1)
    expected = engine.runner.execute(batch, list(range(len(seqs))))
    torch.testing.assert_close(graphs.execute(batch), expected, rtol=1e-5, atol=1e-5)
    assert not graphs.fits(SchedulerOutput([ScheduledSeq(seqs[0], 2)]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_captured_graphs_equal_the_plain_runner(make_checkpoint):
    path, _ = make_checkpoint("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cuda",
                                    num_kv_blocks=64, block_size=16))
    r = engine.runner
    graphs = DecodeGraphs(r.model, r.kv_cache, r.backend, max_seqs=8, max_blocks_per_seq=8,
                          capture=True)
    seqs = _decoding_seqs(engine, [3, 17, 16, 40, 1])
    batch = SchedulerOutput([ScheduledSeq(s, 1) for s in seqs])
    expected = r.execute(batch, list(range(len(seqs))))
    torch.testing.assert_close(graphs.execute(batch), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_graphed_draft_keeps_greedy_output():
    from raysvc import LLM

    prompts = ["The list type", "A dictionary is a", "def f(x):", "The while statement"]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    plain = LLM(dtype="float32", device="cuda").generate(prompts, params)
    spec = LLM(dtype="float32", device="cuda", speculative_config={
        "method": "draft_model", "num_speculative_tokens": 4, "adaptive": False})
    assert spec.engine.spec.proposer.graphs is not None
    out = spec.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain]
    assert spec.stats()["spec_accepted_tokens"] > 0
