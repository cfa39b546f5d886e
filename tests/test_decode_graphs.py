"""Step graphs: the static-buffer decode and verification steps equal the plain runner's.

On CPU the buffers run eagerly (padding rows, block tables, slots: the logic a graph
replays), also driven by the engine itself; on CUDA the captured graphs replay it, and
greedy output with graphs (plain and speculative) equals the eager engine's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_leaks

from raysvc.engine.config import EngineConfig
from raysvc.engine.decode_graphs import DecodeGraphs
from raysvc.engine.llm_engine import LLMEngine
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
from raysvc.engine.sequence import Request
from raysvc.engine.spec.proposal import Proposal

CUDA = torch.cuda.is_available()


def _run(runner, batch: SchedulerOutput, rows: list[int], graphs: DecodeGraphs | None = None):
    """One step through `runner`, eagerly, or through `graphs` (which must take it)."""
    runner.graphs = graphs
    try:
        step = runner.prepare(batch, rows)
        assert (step.query_len is not None) == (graphs is not None)
        return runner.execute(step)
    finally:
        runner.graphs = None


def _decoding_seqs(engine: LLMEngine, lengths: list[int]):
    """Sequences with their prompts' KV in the pool and one new token to decode each."""
    seqs = []
    for i, n in enumerate(lengths):
        seq = Request(f"r{i}", None, [(7 * i + j) % 50 + 3 for j in range(n)], SamplingParams(),
                      ()).seqs[0]
        engine.block_manager.allocate_slots(seq, n)
        _run(engine.runner, SchedulerOutput([ScheduledSeq(seq, n)]), [n - 1])
        seq.num_computed_tokens = n
        seq.token_ids.append(11 + i)
        engine.block_manager.allocate_slots(seq, 1)
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
    assert graphs.padded_size(batch) == {1: 1, 3: 4, 5: 5}[len(seqs)]
    rows = list(range(len(seqs)))
    expected = _run(engine.runner, batch, rows)
    got = _run(engine.runner, batch, rows, graphs)  # writes the same K/V to the same slots
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # padding rows wrote nowhere: every sequence's next step still agrees
    for s in seqs:
        s.num_computed_tokens += 1
        s.token_ids.append(5)
        engine.block_manager.allocate_slots(s, 1)
    expected = _run(engine.runner, batch, rows)
    torch.testing.assert_close(_run(engine.runner, batch, rows, graphs), expected, rtol=1e-5,
                               atol=1e-5)
    assert graphs.padded_size(SchedulerOutput([ScheduledSeq(seqs[0], 2)])) is None


def test_verification_shapes_equal_the_plain_runner(make_checkpoint):
    """q = k + 1 tokens per sequence: the last known token plus k proposals."""
    path, _ = make_checkpoint("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=64,
                                    block_size=8))
    r = engine.runner
    graphs = DecodeGraphs(r.model, r.kv_cache, r.backend, max_seqs=4, max_blocks_per_seq=8,
                          capture=False, query_lens=(1, 4))
    seqs = _decoding_seqs(engine, [6, 15, 1])
    for i, s in enumerate(seqs):
        s.proposal = Proposal([20 + i, 30 + i, 40 + i], None)
        engine.block_manager.allocate_slots(s, 4)
    batch = SchedulerOutput([ScheduledSeq(s, 4, 3) for s in seqs])
    assert graphs.padded_size(batch) == 4
    assert graphs.padded_size(SchedulerOutput([ScheduledSeq(s, 3, 2) for s in seqs])) is None
    expected = _run(r, batch, list(range(12)))
    torch.testing.assert_close(_run(r, batch, list(range(12)), graphs), expected, rtol=1e-5,
                               atol=1e-5)


def _attach_buffers(runner, query_lens) -> list[int]:
    """Give a runner uncaptured graph buffers; returns the list of each use's query length."""
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, runner.backend, max_seqs=4,
                                 max_blocks_per_seq=8, capture=False, query_lens=query_lens)
    used: list[int] = []
    run = runner.graphs.execute
    runner.graphs.execute = lambda step: used.append(step.query_len) or run(step)
    return used


@pytest.mark.parametrize("spec", [
    None,
    {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False},
    {"method": "draft_model", "num_speculative_tokens": 3},
    {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False},
])
def test_engine_steps_through_the_buffers_keep_greedy_output(spec):
    """The engine's own use of the graphs, run eagerly on CPU, as the engine sets it up on
    CUDA: the runner picks the buffers for uniform steps and selects the rows it needs,
    short proposals are padded, probes take every sequence, the draft's catch-up is made
    uniform. Greedy output unchanged."""
    from raysvc import LLM

    prompts = ["The list type", "A dictionary is a", "def f(x):", "The while statement",
               "Exceptions are"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = LLM(dtype="float32").generate(prompts, params)
    llm = LLM(dtype="float32", speculative_config=spec, max_num_seqs=4)
    used = _attach_buffers(llm.engine.runner, (1, 2, 3, 4))
    draft_used: list[int] = []
    if spec is not None:
        llm.engine.spec.uniform = True
        if spec["method"] == "draft_model":
            draft_used = _attach_buffers(llm.engine.spec.proposer.runner, (1, 2))
    out = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in expected]
    # plain: decode steps (q = 1); k = 3: verification steps (q = 4)
    assert (1 if spec is None else 4) in used, f"no uniform step used the buffers: {used}"
    if draft_used:
        assert 1 in draft_used and 2 in draft_used, draft_used  # rounds, uniform catch-up
    assert_no_leaks(llm.engine)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_captured_graphs_equal_the_plain_runner(make_checkpoint):
    path, _ = make_checkpoint("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cuda",
                                    num_kv_blocks=64, block_size=16, enforce_eager=True))
    r = engine.runner
    graphs = DecodeGraphs(r.model, r.kv_cache, r.backend, max_seqs=8, max_blocks_per_seq=8,
                          capture=True, query_lens=(1, 3))
    seqs = _decoding_seqs(engine, [3, 17, 16, 40, 1])
    batch = SchedulerOutput([ScheduledSeq(s, 1) for s in seqs])
    rows = list(range(len(seqs)))
    expected = _run(r, batch, rows)
    torch.testing.assert_close(_run(r, batch, rows, graphs), expected, rtol=1e-4, atol=1e-4)
    for i, s in enumerate(seqs):
        s.proposal = Proposal([20 + i, 30 + i], None)
        engine.block_manager.allocate_slots(s, 3)
    batch = SchedulerOutput([ScheduledSeq(s, 3, 2) for s in seqs])
    expected = _run(r, batch, list(range(15)))
    torch.testing.assert_close(_run(r, batch, list(range(15)), graphs), expected, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [None, {"method": "draft_model", "num_speculative_tokens": 4,
                                         "adaptive": False}])
def test_graphed_engine_keeps_greedy_output(spec):
    from raysvc import LLM

    prompts = ["The list type", "A dictionary is a", "def f(x):", "The while statement"] * 3
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    eager = LLM(dtype="float32", enforce_eager=True, num_kv_blocks=512)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    del eager
    llm = LLM(dtype="float32", speculative_config=spec, num_kv_blocks=512)
    assert llm.engine.runner.graphs is not None
    if spec is not None:
        assert llm.engine.spec.proposer.runner.graphs is not None
    out = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in out] == expected
    assert_no_leaks(llm.engine)


def test_pad_proposals_makes_verification_uniform_within_room():
    import torch as t

    from raysvc.engine.spec.decoder import pad_proposals

    seqs = [Request(f"r{i}", None, [3, 4, 5 + i], SamplingParams(), ()).seqs[0]
            for i in range(4)]
    seqs[0].proposal = Proposal([7, 8, 9], None)
    seqs[1].proposal = Proposal([7], None)  # short n-gram match: padded with its last proposal
    seqs[2].proposal = None  # no match: guesses its own last token
    seqs[3].proposal = Proposal([7], t.ones(1, 10) / 10)  # a draft's q: not padded
    pad_proposals(seqs, [3, 3, 3, 3])
    assert [s.proposal.tokens for s in seqs] == [[7, 8, 9], [7, 7, 7], [7, 7, 7], [7]]
    short = Request("x", None, [3, 4], SamplingParams(), ()).seqs[0]
    short.proposal = Proposal([6], None)
    pad_proposals([seqs[0], short], [3, 2])  # room 2 < 3: left as it is
    assert short.proposal.tokens == [6]


def test_long_context_decode_is_left_to_the_split_kv_kernel(make_checkpoint):
    """With `split_aware` (on CUDA), a decode batch the eager path would split (few
    sequences, long context) runs eagerly; short contexts and larger batches replay."""
    from raysvc_kernels.triton_attention import decode_num_splits

    path, _ = make_checkpoint("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=8))
    r = engine.runner
    graphs = DecodeGraphs(r.model, r.kv_cache, r.backend, max_seqs=4, max_blocks_per_seq=8,
                          capture=False, split_aware=True)

    def decoding(context: int):
        seq = Request("r", None, [3] * context, SamplingParams(), ()).seqs[0]
        seq.num_computed_tokens = context - 1
        return ScheduledSeq(seq, 1)

    kv_heads = r.kv_cache.data.shape[4]
    assert decode_num_splits(1, kv_heads, 1100, r.model.device) > 1  # the eager choice
    assert graphs.padded_size(SchedulerOutput([decoding(1100)])) is None
    assert graphs.padded_size(SchedulerOutput([decoding(100)])) == 1
    assert decode_num_splits(4, kv_heads, 600, r.model.device) == 1
    assert graphs.padded_size(SchedulerOutput([decoding(600) for _ in range(4)])) == 4
