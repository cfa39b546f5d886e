"""The ingress's incremental detokenizer: UTF-8-safe pieces that add up to the full text,
and stop strings cut exactly, never shown early while streaming."""

from __future__ import annotations

import pytest

from raysvc.serve.detokenizer import SampleText

TEXTS = ["héllo wörld ☃ and more ☃☃ text", "The list type is a mutable sequence.",
         "def f(x):\n    return x * 2  # doubles ☃"]


@pytest.fixture(scope="module")
def tok(make_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_checkpoint("llama")[0])


def _stream(tok, ids, stop=(), step=1, include_stop=False):
    prompt = tok.encode("Stop strings")
    sample = SampleText(tok, prompt, list(stop), include_stop)
    pieces = []
    for i in range(0, len(ids), step):
        sample.add(ids[i:i + step])
        pieces.append(sample.take())
        if sample.finished:
            break
    if not sample.finished:
        sample.finish("length")
    pieces.append(sample.take())
    return sample, pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_pieces_add_up_and_never_split_a_character(tok, text, step):
    ids = tok.encode(text, add_special_tokens=False)
    sample, pieces = _stream(tok, ids, step=step)
    assert "".join(pieces) == sample.text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert sample.num_output_tokens == len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_stop_strings_cut_and_are_held_back(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    for stop in (full[5:8], full[-3:], "☃", "no such stop"):
        sample, pieces = _stream(tok, ids, stop=[stop, "zzzzzzzz"])
        at = full.find(stop)
        expected = full if at < 0 else full[:at]
        assert "".join(pieces) == sample.text == expected, stop
        assert sample.finish_reason == ("length" if at < 0 else "stop")
        if at >= 0:
            assert sample.stop_reason == stop
            shown = ""
            for p in pieces[:-1]:
                shown += p
                assert stop not in shown
        kept, _ = _stream(tok, ids, stop=[stop], include_stop=True)
        assert kept.text == (full if at < 0 else full[:at + len(stop)])
