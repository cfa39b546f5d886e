"""[kv-fabric] step 1: prefix KV moved between two engines of the same model.

References: the exporting engine's own KV bytes (bit-exact copies), a fresh engine that
recomputes the prompt (same greedy output), and HF transformers for the output itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_leaks, hf_greedy

from raysvc import LLM, SamplingParams
from raysvc.block_hash import hash_blocks

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BLOCK = 8


def _prompt(n: int = 45, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def _blocks_of(llm: LLM, hashes: list[bytes]) -> torch.Tensor:
    blocks = llm.engine.block_manager.cached_run(hashes)
    return llm.engine.runner.kv_cache.data[:, :, blocks]


def test_round_trip_is_bit_exact_and_saves_the_prefill(make_checkpoint):
    path, hf = make_checkpoint("llama")
    source, target = LLM(path, block_size=BLOCK), LLM(path, block_size=BLOCK)
    prompt = _prompt()
    (done,) = source.generate([prompt], GREEDY)
    hashes = hash_blocks(prompt[:-1], BLOCK)  # what a later request of this prompt reuses
    kv = source.engine.export_kv(hashes)
    assert kv.num_blocks == len(hashes) == 5
    assert kv.nbytes == _blocks_of(source, hashes).numel() * 4  # fp32, one buffer

    published = []
    target.engine.subscribe_kv_events(published.append)
    assert target.engine.import_kv(kv) == 5
    assert torch.equal(_blocks_of(target, hashes), _blocks_of(source, hashes))  # same bits
    stored = [h for batch in published for e in batch.events if e.kind == "stored"
              for h in e.block_hashes]
    assert stored == hashes  # announced like computed blocks (the router's index sees them)
    assert target.engine.import_kv(kv) == 0  # held already

    before = target.stats()["num_computed_tokens"]
    (out,) = target.generate([prompt], GREEDY)
    stats = target.stats()
    assert stats["prefix_cache_hits"] == 5 * BLOCK
    assert stats["num_computed_tokens"] - before < len(prompt)  # the prefix was not recomputed
    assert out.outputs[0].token_ids == done.outputs[0].token_ids == hf_greedy(hf, prompt, 8)
    assert stats["kv_blocks_imported"] == 5 and source.stats()["kv_blocks_exported"] == 5
    assert_no_leaks(source.engine)
    assert_no_leaks(target.engine)


def test_builtin_bf16_blocks_travel_as_bytes():
    source, target = LLM(block_size=16), LLM(block_size=16)
    prompt = source.tokenizer("The list type is a mutable sequence. " * 6)["input_ids"]
    (done,) = source.generate([prompt], GREEDY)
    hashes = hash_blocks(prompt[:-1], 16)
    kv = source.engine.export_kv(hashes)
    assert kv.fingerprint["dtype"] == "torch.bfloat16" and target.engine.import_kv(kv) > 0
    assert torch.equal(_blocks_of(target, hashes), _blocks_of(source, hashes))
    (out,) = target.generate([prompt], GREEDY)
    assert out.outputs[0].token_ids == done.outputs[0].token_ids


def test_other_model_dtype_or_block_size_is_refused_naming_it(make_checkpoint):
    path, _ = make_checkpoint("llama")
    other, _ = make_checkpoint("llama", seed=1, hidden_size=32, intermediate_size=64)
    source = LLM(path, block_size=BLOCK)
    prompt = _prompt()
    source.generate([prompt], GREEDY)
    kv = source.engine.export_kv(hash_blocks(prompt, BLOCK))
    for kwargs, field in ((dict(model=path, block_size=16), "block_size"),
                          (dict(model=path, block_size=BLOCK, dtype="bfloat16"), "dtype"),
                          (dict(model=other, block_size=BLOCK), "model")):
        target = LLM(kwargs.pop("model"), **kwargs)
        with pytest.raises(ValueError, match=f"kv_blocks: .*{field} is"):
            target.engine.import_kv(kv)
        assert_no_leaks(target.engine)
        assert target.engine.block_manager.num_cached_free == 0


def test_a_failed_or_partial_import_leaves_no_wrong_block(make_checkpoint, monkeypatch):
    path, _ = make_checkpoint("llama")
    source = LLM(path, block_size=BLOCK)
    prompt = _prompt(80)
    source.generate([prompt], GREEDY)
    hashes = hash_blocks(prompt[:-1], BLOCK)
    kv = source.engine.export_kv(hashes)
    assert kv.num_blocks == 9

    # a write that fails: nothing registered, every block back in the free queue
    target = LLM(path, block_size=BLOCK)
    data = target.engine.runner.kv_cache.data
    monkeypatch.setattr(data, "index_copy_", lambda *a: (_ for _ in ()).throw(
        RuntimeError("device lost")), raising=False)
    with pytest.raises(RuntimeError, match="device lost"):
        target.engine.import_kv(kv)
    monkeypatch.undo()
    bm = target.engine.block_manager
    assert not bm.cached and bm.num_free_blocks == bm.num_blocks
    assert_no_leaks(target.engine)

    # a pool with room for 6 blocks takes the chain's first 6, a whole prefix
    small = LLM(path, block_size=BLOCK, num_kv_blocks=6)
    assert small.engine.import_kv(kv) == 6
    assert len(small.engine.block_manager.cached_run(hashes)) == 6
    assert torch.equal(_blocks_of(small, hashes), _blocks_of(source, hashes[:6]))
    short = GREEDY.model_copy(update={"max_tokens": 4})
    (out,) = small.generate([prompt[:41]], short)  # 40 tokens = 5 imported blocks
    assert small.stats()["prefix_cache_hits"] == 5 * BLOCK
    assert out.outputs[0].token_ids == LLM(path, block_size=BLOCK).generate(
        [prompt[:41]], short)[0].outputs[0].token_ids
    assert_no_leaks(small.engine)
