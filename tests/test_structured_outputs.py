"""[openai-compat] The engine side of structured outputs and logits processing.

References: `jsonschema` validates every JSON output against its schema, `re.fullmatch`
the regex outputs; Hugging Face's own logits processors (`sequence_bias`,
`bad_words_ids`, `prefix_allowed_tokens_fn`) give the expected greedy tokens for logit
bias, bad words and allowed token ids. Speculative decoding must not change a
constrained greedy output."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from conftest import assert_no_leaks

from raysvc import LLM, SamplingParams

PROMPTS = ["The list type is", "A dictionary is a", "def f(x):", "Exceptions are"]


def _s(**kw):
    return {"type": "string", **kw}


def _i(lo=0, hi=99):
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _obj(props, required=None):
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": list(props if required is None else required)}


SCHEMAS = [  # bounded strings and numbers: a small model must finish within max_tokens
    _obj({"name": _s(maxLength=10)}),
    _obj({"age": _i(0, 120)}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"kind": {"enum": ["list", "dict", "set", "tuple"]}}),
    _obj({"n": {"type": "number", "minimum": 0, "maximum": 10}}),
    _obj({"tags": {"type": "array", "items": _s(maxLength=6), "maxItems": 3}}),
    _obj({"point": _obj({"x": _i(), "y": _i()})}),
    _obj({"a": _obj({"b": _obj({"c": {"enum": [1, 2, 3]}})})}),
    _obj({"id": _i(), "label": _s(maxLength=8), "flag": {"type": "boolean"}}),
    _obj({"v": {"anyOf": [_i(), _s(maxLength=5)]}}),
    _obj({"v": {"anyOf": [_obj({"i": _i()}), _obj({"s": _s(maxLength=5)})]}}),
    _obj({"items": {"type": "array", "items": _obj({"k": {"enum": ["a", "b"]}, "v": _i()}),
                    "maxItems": 2}}),
    _obj({"nullable": {"anyOf": [{"type": "null"}, _i()]}}),
    _obj({"const": {"const": "fixed"}}),
    _obj({"matrix": {"type": "array", "maxItems": 2,
                     "items": {"type": "array", "items": _i(0, 9), "maxItems": 2}}}),
    _obj({"name": _s(maxLength=6), "nick": _s(maxLength=6)}, required=["name"]),
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 4},
    {"enum": ["red", "green", "blue"]},
    _obj({"date": _s(pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$")}),
    _obj({"user": _obj({"name": _s(maxLength=8),
                        "roles": {"type": "array", "items": {"enum": ["admin", "dev"]},
                                  "maxItems": 2}}),
          "active": {"type": "boolean"}}),
]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_kv_blocks=512)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    from raysvc.models.builtin import path

    return AutoModelForCausalLM.from_pretrained(path("tiny"), dtype=torch.float32).eval()


def test_json_schema_outputs_validate(llm):
    assert len(SCHEMAS) == 20
    for schema in SCHEMAS:
        params = SamplingParams(max_tokens=100, temperature=0,
                                structured_outputs={"json": schema})
        for out in llm.generate(PROMPTS, params):
            c = out.outputs[0]
            assert c.finish_reason == "stop", (schema, c.text)
            jsonschema.validate(json.loads(c.text), schema)
    # sampled, n > 1: every sample walks the grammar on its own
    schema = SCHEMAS[-1]
    out = llm.generate(PROMPTS[0], SamplingParams(n=4, seed=3, temperature=1.0, max_tokens=100,
                                                  structured_outputs={"json": schema}))[0]
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), schema)
    assert len({c.text for c in out.outputs}) > 1
    assert_no_leaks(llm.engine)


def test_json_object_regex_choice_and_grammar_hold(llm):
    def texts(constraint, **kw):
        params = SamplingParams(**{"max_tokens": 60, "temperature": 0, **kw},
                                structured_outputs=constraint)
        return [o.outputs[0].text for o in llm.generate(PROMPTS, params)]

    for text in texts({"json_object": True}):
        assert isinstance(json.loads(text), dict)
    for text in texts({"regex": r"[0-9]{3}-[a-z]{2,5}"}):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text), text
    choices = ["yes", "no", "it depends"]
    assert set(texts({"choice": choices})) <= set(choices)
    for text in texts({"grammar": 'root ::= "(" [a-c]+ ")"'}, seed=0, temperature=1.0):
        assert re.fullmatch(r"\([a-c]+\)", text), text
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False},
    {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False},
])
def test_speculation_keeps_constrained_greedy_output(llm, spec):
    """Proposals are walked through the grammar to mask every verified row, then rolled
    back: the output is the one plain decoding gives."""
    schema = SCHEMAS[8]
    params = SamplingParams(max_tokens=60, temperature=0, structured_outputs={"json": schema})
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    spec_llm = LLM(dtype="float32", num_kv_blocks=512, speculative_config=spec)
    assert [o.outputs[0].token_ids for o in spec_llm.generate(PROMPTS, params)] == expected
    stats = spec_llm.engine.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["spec_accepted_tokens"] > 0, stats
    assert_no_leaks(spec_llm.engine)


def _hf_generate(hf, llm, prompt: str, n: int, **processors) -> list[int]:
    ids = llm.engine.tokenizer.encode(prompt)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                      dtype=torch.long), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, **processors)
    return out[0, len(ids):].tolist()


def test_logit_bias_allowed_token_ids_and_bad_words_match_hf(llm, hf):
    def ours(prompt, **kw):
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **kw)
        return llm.generate(prompt, params)[0].outputs[0].token_ids

    tok = llm.engine.tokenizer
    prompt = PROMPTS[0]
    plain = ours(prompt)
    assert plain == _hf_generate(hf, llm, prompt, 12)
    bias = {plain[2]: -100.0, 42: 8.0, 7: 3.5}
    got = ours(prompt, logit_bias=bias)
    assert got != plain
    assert got == _hf_generate(hf, llm, prompt, 12,
                               sequence_bias={(t,): b for t, b in bias.items()})
    allowed = sorted({*plain[:4], 11, 12, 13, 500})
    got = ours(prompt, allowed_token_ids=allowed)
    assert set(got) <= set(allowed)
    assert got == _hf_generate(hf, llm, prompt, 12,
                               prefix_allowed_tokens_fn=lambda _batch, _ids: allowed)
    word = tok.decode(plain[1:3]).strip()  # a word the plain output says
    got = ours(prompt, bad_words=[word])
    banned = [tok.encode(w, add_special_tokens=False) for w in (word, " " + word)]
    assert got != plain
    assert got == _hf_generate(hf, llm, prompt, 12, bad_words_ids=banned)


def test_bad_constraints_and_token_ids_are_refused_naming_the_field(llm):
    cases = [
        ({"structured_outputs": {"json": {"type": "frob"}}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}},
         "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"logit_bias": {10 ** 6: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
    ]
    for kw, field in cases:
        with pytest.raises(ValueError, match=re.escape(field)):
            llm.engine.add_request("bad", "x", SamplingParams(**kw))
        assert "bad" not in llm.engine.requests
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_masking_equals_xgrammars_kernel(dtype):
    import xgrammar as xgr

    from raysvc.engine.structured_output import _mask_on_host

    g = torch.Generator().manual_seed(0)
    for indices in (list(range(8)), [1, 5, 6]):
        logits = torch.randn(8, 4096, generator=g).to(dtype)
        bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (8, 128), dtype=torch.int32, generator=g)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=4000, indices=indices)
        _mask_on_host(logits, bitmask, indices, 4000)
        assert torch.equal(logits, expected)


def test_a_continuation_resumes_the_grammar_where_the_output_stopped(llm):
    """Failover and hand-over continue a request with prompt + output so far: its grammar
    must resume after that output (a fresh one would start a second JSON value)."""
    schema = SCHEMAS[8]
    constraint = {"json": schema}
    tok = llm.engine.tokenizer
    prompt = tok.encode(PROMPTS[1])
    full = llm.generate(prompt, SamplingParams(max_tokens=100, temperature=0,
                                               structured_outputs=constraint))[0].outputs[0]
    cut = 7
    head = full.token_ids[:cut]
    rest = llm.generate(prompt + head, SamplingParams(
        max_tokens=100 - cut, temperature=0, structured_outputs=constraint,
        continued_output_tokens=cut))[0].outputs[0]
    assert head + rest.token_ids == full.token_ids
    jsonschema.validate(json.loads(tok.decode(head + rest.token_ids, skip_special_tokens=True)),
                        schema)
    with pytest.raises(ValueError, match="continued_output_tokens"):
        llm.engine.add_request("bad", prompt + tok.encode("]]", add_special_tokens=False),
                               SamplingParams(structured_outputs=constraint,
                                              continued_output_tokens=2))
    assert_no_leaks(llm.engine)
