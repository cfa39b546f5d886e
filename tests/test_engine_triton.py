"""The engine on the Triton attention path (interpreted on CPU) equals the torch path."""

from __future__ import annotations

import os

import pytest
from conftest import assert_no_leaks

from raysvc import LLM, SamplingParams


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter on CPU")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_greedy_equals_torch_backend(make_checkpoint, arch):
    path, _ = make_checkpoint(arch)
    prompts = [[5, 6, 7], list(range(3, 40)), [9] * 17, list(range(100, 121))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    # chunked prefill on a cached prefix, decode, and preemption all on the Triton path
    kw = dict(block_size=8, max_num_batched_tokens=16, num_kv_blocks=8)
    torch_out = LLM(path, attention_backend="torch", **kw).generate(prompts, params)
    llm = LLM(path, attention_backend="triton", **kw)
    triton_out = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in triton_out] == \
        [o.outputs[0].token_ids for o in torch_out]
    assert llm.stats()["num_preemptions"] > 0
    assert_no_leaks(llm.engine)
