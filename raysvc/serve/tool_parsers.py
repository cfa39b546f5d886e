"""Tool calls in a model's text, per model family, as `tool_choice: "auto"` reads them.

Each family writes calls its own way (names as vLLM's `--tool-call-parser`):
- "hermes" (Qwen2.5, Qwen3, Hermes, and raysvc's built-in model):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks among the text;
- "llama3_json" (Llama 3.1-3.3): the whole answer is `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`), several separated by `;`;
- "mistral": `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}` (v3 format), or
  `name[ARGS]{...}` per call (v11 format).
A forced choice is read the same way, its text held to a grammar (serve/planner.py):
- "required": the whole answer is a JSON array of `{"name": ..., "parameters": {...}}`;
- "named:<function>": the whole answer is that function's arguments.
`parse` turns a finished text into (content, calls); `ToolStream` does it for a stream:
text that cannot be part of a call goes out as content at once, a call goes out as a
`delta.tool_calls` entry (its name, then its arguments) as soon as it is complete; a named
function's arguments go out in fragments as they are generated, as OpenAI streams them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass(slots=True)
class Call:
    name: str
    arguments: str  # JSON text

    def id(self, request_id: str, choice: int, position: int) -> str:
        """Deterministic per request (a batch rerun writes the same bytes), OpenAI-shaped."""
        digest = hashlib.sha256(f"{request_id}/{choice}/{position}".encode()).hexdigest()
        return f"call_{digest[:24]}"


def parser_for(chat_template: str | None, model_type: str = "") -> str:
    """The family a model writes calls in: from its chat template, else its architecture."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t or model_type == "mistral":
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t or model_type == "llama":
        return "llama3_json"
    return "hermes"


def _call(obj: object) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return Call(obj["name"], args if isinstance(args, str) else json.dumps(args,
                                                                          ensure_ascii=False))


def _objects(text: str) -> list[object] | None:
    """Every JSON value in `text` (separated by whitespace, `;` or `,`), or None if any
    part is not JSON."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i >= len(text):
            return out
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(obj)


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MISTRAL_V11 = re.compile(r"([A-Za-z_][\w.\-]*)\[ARGS\]")


def parse(parser: str, text: str) -> tuple[str | None, list[Call]]:
    """(content, calls) of a finished answer; content is None when only calls were said."""
    calls: list[Call] = []
    if parser == "required" or parser.startswith("named:"):
        try:
            value = json.loads(text)
        except ValueError:
            return text, []  # cut short (max_tokens): no call to make of it
        if parser == "required":
            calls = [c for c in map(_call, value if isinstance(value, list) else [])
                     if c is not None]
        else:
            calls = [Call(parser[len("named:"):], text.strip())]
        return (None, calls) if calls else (text, [])
    if parser == "hermes":
        rest = text
        for match in _HERMES.finditer(text):
            objs = _objects(match.group(1))
            found = [c for c in map(_call, objs or []) if c is not None]
            if found:
                calls += found
                rest = rest.replace(match.group(0), "", 1)
        content = rest.strip() if calls else text
    elif parser == "llama3_json":
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        objs = _objects(body) if body.startswith("{") else None
        found = [c for c in map(_call, objs or [])]
        if objs and all(c is not None for c in found):
            calls, content = found, ""
        else:
            content = text
    elif parser == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        content = head.strip() if marker else text
        if marker:
            calls = _mistral_calls(tail.strip())
            if not calls:
                content = text
    else:
        raise ValueError(f"tool_call_parser: {parser!r} is not one of {', '.join(PARSERS)}")
    return (content or None) if calls else text, calls


def _mistral_calls(tail: str) -> list[Call]:
    if _MISTRAL_V11.match(tail):  # name[ARGS]{...} per call
        calls, parts = [], _MISTRAL_V11.split(tail)
        for name, args in zip(parts[1::2], parts[2::2], strict=False):
            objs = _objects(args.strip())
            if not objs:
                return []
            calls.append(Call(name, json.dumps(objs[0], ensure_ascii=False)))
        return calls
    objs = _objects(tail)
    if not objs:
        return []
    items = objs[0] if len(objs) == 1 and isinstance(objs[0], list) else objs
    found = [_call(o) for o in items]
    return found if found and all(c is not None for c in found) else []


# Where a call can begin: text before this is content for sure.
_STARTS = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",),
           "llama3_json": ("<|python_tag|>", "{")}


class ToolStream:
    """One choice's text as it streams: content out at once, calls out when complete."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.pending = ""  # text held back: it may begin a call
        self.in_call = False
        self.seen_text = False  # llama3_json: a call must open the answer
        self.calls: list[Call] = []
        # a named function (forced): the answer is its arguments, streamed as fragments
        self.named = parser[len("named:"):] if parser.startswith("named:") else None

    def feed(self, text: str) -> tuple[str, list[Call]]:
        """(content that is safe to send now, calls completed by this text)."""
        self.pending += text
        if self.parser not in PARSERS:  # a forced choice: the answer is the calls
            return "", []
        content, done = "", []
        while self.pending:
            if not self.in_call:
                at, marker = self._find_start()
                if at < 0:
                    keep = self._partial_marker()
                    content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    if content.strip():
                        self.seen_text = True
                    break
                content += self.pending[:at]
                self.pending = self.pending[at:]
                self.in_call = True
            if self.parser != "hermes":  # the rest of the answer is the calls
                break
            end = self.pending.find("</tool_call>")
            if end < 0:
                break
            block = self.pending[:end + len("</tool_call>")]
            self.pending = self.pending[len(block):]
            self.in_call = False
            _, calls = parse("hermes", block)
            if calls:
                done += calls
            else:
                content += block
        self.calls += done
        return content, done

    def finish(self) -> tuple[str, list[Call]]:
        """What is left at the end: the calls in held-back text, or that text as content."""
        rest, self.pending = self.pending, ""
        if not rest:
            return "", []
        content, calls = parse(self.parser, rest)
        self.calls += calls
        return content or "", calls

    def _find_start(self) -> tuple[int, str]:
        best = (-1, "")
        for marker in _STARTS[self.parser]:
            if marker == "{" and (self.seen_text or self.pending.lstrip()[:1] != "{"):
                continue
            at = self.pending.find(marker)
            if at >= 0 and (best[0] < 0 or at < best[0]):
                best = (at, marker)
        return best

    def _partial_marker(self) -> int:
        """Characters at the end of `pending` that could begin a marker."""
        keep = 0
        for marker in _STARTS[self.parser]:
            for n in range(min(len(marker) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(marker[:n]):
                    keep = max(keep, n)
                    break
        if self.parser == "llama3_json" and not self.seen_text and not self.pending.strip():
            keep = len(self.pending)  # leading whitespace: a call may still open the answer
        return keep
