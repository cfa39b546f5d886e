"""Incremental, UTF-8-safe detokenization and stop strings.

Decoding a growing token list one token at a time is wrong for byte-level BPE (a
character can span tokens) and for tokenizers that merge spaces, so each step decodes a
short window — from `prefix_offset` to the end — and emits only what extends the text
decoded up to `read_offset`. A window that ends in a partial character (U+FFFD) waits
for the next token.
"""

from __future__ import annotations

from raysvc.engine.sequence import Sequence


def decode_increment(tokenizer, ids: list[int], prefix_offset: int, read_offset: int,
                     skip_special_tokens: bool) -> tuple[str, int, int]:
    """(the new text, the next prefix_offset, the next read_offset) after `ids` grew.

    The one incremental decoder: the engine's sequences and the ingress's samples
    (`raysvc.serve.detokenizer.SampleText`) both call it, so their texts agree."""
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset],
                                   skip_special_tokens=skip_special_tokens)
    full_text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
        return "", prefix_offset, read_offset
    return full_text[len(prefix_text):], read_offset, len(ids)


def detokenize_step(tokenizer, seq: Sequence) -> str:
    """Append the text of `seq`'s newest tokens to `seq.text`; return the new piece."""
    delta, seq.prefix_offset, seq.read_offset = decode_increment(
        tokenizer, seq.token_ids, seq.prefix_offset, seq.read_offset,
        seq.request.params.skip_special_tokens)
    seq.text += delta
    return delta


def find_stop(text: str, new_len: int, stops: list[str],
              include_stop: bool) -> tuple[str, str] | None:
    """(the text cut at the first stop string, that string) if one ends in the last
    `new_len` characters, else None. Only the tail that could hold one is searched; the
    cut text holds the stop string only with `include_stop`."""
    for stop in stops:
        start = max(len(text) - new_len - len(stop) + 1, 0)
        at = text.find(stop, start)
        if at != -1:
            return text[:at + len(stop) if include_stop else at], stop
    return None


def find_stop_string(seq: Sequence, new_len: int) -> str | None:
    """If a stop string appeared in the last `new_len` characters, cut the text there."""
    params = seq.request.params
    found = find_stop(seq.text, new_len, params.stop, params.include_stop_str_in_output)
    if found is None:
        return None
    seq.text, stop = found
    return stop


def visible_end(seq: Sequence) -> int:
    """How much of `seq.text` is safe to show while streaming: what may be the start of a
    stop string is held back."""
    stops = seq.request.params.stop
    if seq.is_finished or not stops or seq.request.params.include_stop_str_in_output:
        return len(seq.text)
    return max(len(seq.text) - (max(len(s) for s in stops) - 1), 0)


def visible_text(seq: Sequence) -> str:
    return seq.text[:visible_end(seq)]
