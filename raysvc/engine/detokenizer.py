"""Incremental, UTF-8-safe detokenization and stop strings.

Decoding a growing token list one token at a time is wrong for byte-level BPE (a
character can span tokens) and for tokenizers that merge spaces, so each step decodes a
short window — from `prefix_offset` to the end — and emits only what extends the text
decoded up to `read_offset`. A window that ends in a partial character (U+FFFD) waits
for the next token.
"""

from __future__ import annotations

from raysvc.engine.sequence import Sequence


def detokenize_step(tokenizer, seq: Sequence) -> str:
    """Append the text of `seq`'s newest tokens to `seq.text`; return the new piece."""
    skip = seq.request.params.skip_special_tokens
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset],
                                   skip_special_tokens=skip)
    full_text = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
        return ""
    delta = full_text[len(prefix_text):]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(ids)
    seq.text += delta
    return delta


def find_stop_string(seq: Sequence, new_len: int) -> str | None:
    """If a stop string appeared in the last `new_len` characters, cut the text there.

    Only the tail that could contain a stop string ending in the new text is searched.
    The returned text never holds the stop string unless include_stop_str_in_output.
    """
    params = seq.request.params
    for stop in params.stop:
        start = max(len(seq.text) - new_len - len(stop) + 1, 0)
        at = seq.text.find(stop, start)
        if at != -1:
            end = at + len(stop) if params.include_stop_str_in_output else at
            seq.text = seq.text[:end]
            return stop
    return None


def visible_end(seq: Sequence) -> int:
    """How much of `seq.text` is safe to show while streaming: what may be the start of a
    stop string is held back."""
    stops = seq.request.params.stop
    if seq.is_finished or not stops or seq.request.params.include_stop_str_in_output:
        return len(seq.text)
    return max(len(seq.text) - (max(len(s) for s in stops) - 1), 0)


def visible_text(seq: Sequence) -> str:
    return seq.text[:visible_end(seq)]
