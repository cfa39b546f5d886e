"""One sample's text, built in the ingress: incremental UTF-8-safe decoding and stop strings.

The engine's own decoder and stop-string search (`raysvc/engine/detokenizer.py`), so text
served over HTTP equals `LLM.generate`'s: each token decodes a short window from
`prefix_offset` and emits only what extends the text decoded up to `read_offset`; a
window that ends in a partial character (U+FFFD) waits for the next token. Stop strings
are checked after every token (only the tail that could hold one), so the token count at
a stop is exact, and while streaming the last `max(len(stop)) - 1` characters are held
back in case they begin a stop string.
"""

from __future__ import annotations

from raysvc.engine.detokenizer import decode_increment, find_stop


class SampleText:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop: bool = False, skip_special_tokens: bool = True,
                 min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.min_tokens = min_tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.prefix_offset = max(len(prompt_token_ids) - 5, 0)
        self.read_offset = len(prompt_token_ids)
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.logprobs: list[dict[int, tuple[float, int]]] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def add(self, token_ids: list[int],
            logprobs: list[dict[int, tuple[float, int]]] | None = None,
            hide_last: bool = False) -> None:
        """Append new tokens; stops (and ignores the rest) at the first stop string. With
        `hide_last`, the last token counts but adds no text (a stop token: EOS, or one of
        stop_token_ids, unless include_stop_str_in_output), as in vLLM."""
        for i, token in enumerate(token_ids):
            if self.finished:
                return
            self.token_ids.append(token)
            if logprobs is not None:
                self.logprobs.append(logprobs[i])
            if hide_last and i == len(token_ids) - 1 and not self.include_stop:
                self.prefix_offset = self.read_offset = len(self.token_ids)
                return
            delta = self._decode_step()
            if delta and self.stop and self.num_output_tokens >= self.min_tokens:
                self._find_stop(len(delta))

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if not self.finished:
            self.finish_reason, self.stop_reason = reason, stop_reason

    def take(self) -> str:
        """The text not handed out yet that is safe to show now."""
        end = len(self.text)
        if not self.finished and self.stop and not self.include_stop:
            end = max(end - (max(len(s) for s in self.stop) - 1), self.sent)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    def _decode_step(self) -> str:
        delta, self.prefix_offset, self.read_offset = decode_increment(
            self.tokenizer, self.token_ids, self.prefix_offset, self.read_offset,
            self.skip_special_tokens)
        self.text += delta
        return delta

    def _find_stop(self, new_len: int) -> None:
        found = find_stop(self.text, new_len, self.stop, self.include_stop)
        if found is not None:
            self.text, stop = found
            self.sent = min(self.sent, len(self.text))
            self.finish("stop", stop)
