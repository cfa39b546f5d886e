"""Tool calls read out of model text, per family, on outputs written the way each family's
models write them (Qwen2.5/3 and Hermes, Llama 3.1-3.3, Mistral v3 and v11), whole and
streamed in arbitrary pieces: a stream must end with the same content and calls."""

from __future__ import annotations

import json
import random

import pytest

from raysvc.serve.tool_parsers import ToolStream, parse, parser_for

CASES = [
    # (parser, text, content, [(name, arguments)])
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
               '{"name": "b", "arguments": {"x": [1, 2]}}\n</tool_call>',
     None, [("a", {}), ("b", {"x": [1, 2]})]),
    ("hermes", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; '
                    '{"name": "g", "parameters": {}}', None, [("f", {"a": 1}), ("g", {})]),
    ("llama3_json", "The answer is {\"x\": 1} in JSON.", "The answer is {\"x\": 1} in JSON.",
     []),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     "Sure.", [("get_weather", {"city": "Rome"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}lookup[ARGS]{"q": "x"}', None,
     [("get_weather", {"city": "Rome"}), ("lookup", {"q": "x"})]),
    ("mistral", "Plain answer.", "Plain answer.", []),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_parse_whole(parser, text, content, calls):
    got_content, got = parse(parser, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_stream_in_random_pieces_ends_the_same(parser, text, content, calls, seed):
    rng = random.Random(seed)
    stream, out, got = ToolStream(parser), "", []
    i = 0
    while i < len(text):
        step = rng.randint(1, 7)
        piece_content, done = stream.feed(text[i:i + step])
        out += piece_content
        got += done
        i += step
    rest, more = stream.finish()
    out, got = out + rest, got + more
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    if calls:  # content around calls: the same words (whitespace may differ at the edges)
        assert out.strip() == (content or "")
    else:
        assert out == text


def test_content_before_a_call_streams_before_the_call_is_complete():
    stream = ToolStream("hermes")
    content, calls = stream.feed("Let me look that up. <tool_")
    assert content == "Let me look that up. " and not calls  # "<tool_" is held back
    content, calls = stream.feed('call>{"name": "f", "arguments": {}}')
    assert content == "" and not calls
    content, calls = stream.feed("</tool_call>")
    assert [c.name for c in calls] == ["f"]


def test_parser_for_models():
    assert parser_for("...<tool_call>...") == "hermes"
    assert parser_for("...[TOOL_CALLS]...") == "mistral"
    assert parser_for("...<|python_tag|>...") == "llama3_json"
    assert parser_for(None, "mistral") == "mistral"
    assert parser_for("", "llama") == "llama3_json"
    from raysvc.engine.loading import load_tokenizer
    from raysvc.models.builtin import path

    assert parser_for(load_tokenizer(path("tiny")).chat_template) == "hermes"
