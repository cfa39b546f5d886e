"""Response bodies and stream chunks in OpenAI's shapes, built from a finished or moving
`Generation`. Logprobs are decoded here (workers run without a tokenizer)."""

from __future__ import annotations

from raysvc.serve.detokenizer import SampleText
from raysvc.serve.generation import Generation
from raysvc.serve.schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatLogprobToken,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    TopLogprob,
    Usage,
)


def usage(gen: Generation) -> Usage:
    prompt, completion = gen.num_prompt_tokens, gen.num_output_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


class LogprobCursor:
    """Hands out each sample's logprobs once, in OpenAI's completion or chat shape."""

    def __init__(self, tokenizer, top_n: int | None) -> None:
        self.tokenizer = tokenizer
        self.top_n = top_n  # None: logprobs were not requested
        self.sent: dict[int, int] = {}  # choice index -> tokens whose logprobs were sent
        self.offsets: dict[int, int] = {}  # choice index -> text offset of the next token

    def _new(self, index: int, sample: SampleText) -> list[tuple[int, dict]]:
        start = self.sent.get(index, 0)
        tokens = sample.output_token_ids[start:len(sample.logprobs)]
        self.sent[index] = start + len(tokens)
        return list(zip(tokens, sample.logprobs[start:start + len(tokens)], strict=True))

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _top(self, entries: dict) -> list[tuple[str, float]]:
        ranked = sorted(entries.items(), key=lambda kv: kv[1][1])
        return [(self._text(t), lp) for t, (lp, rank) in ranked if rank <= self.top_n]

    def completion(self, index: int, sample: SampleText, base_offset: int = 0
                   ) -> CompletionLogprobs | None:
        if self.top_n is None:
            return None
        out = CompletionLogprobs()
        offset = self.offsets.get(index, base_offset)
        for token, entries in self._new(index, sample):
            text = self._text(token)
            out.tokens.append(text)
            out.token_logprobs.append(entries[token][0])
            top = dict(self._top(entries))
            top.setdefault(text, entries[token][0])
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return out

    def chat(self, index: int, sample: SampleText) -> ChatLogprobs | None:
        if self.top_n is None:
            return None
        content = []
        for token, entries in self._new(index, sample):
            text = self._text(token)
            top = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                   for t, lp in self._top(entries)]
            content.append(ChatLogprobToken(token=text, logprob=entries[token][0],
                                            bytes=list(text.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)


def completion_response(request_id: str, model: str, gen: Generation, prompt_texts: list[str],
                        cursor: LogprobCursor, created: int) -> CompletionResponse:
    choices = []
    n = len(gen.samples[0])
    for index, sample in enumerate(gen.choices):
        prefix = prompt_texts[index // n]
        choices.append(CompletionChoice(
            index=index, text=prefix + sample.text, finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            logprobs=cursor.completion(index, sample, len(prefix))))
    return CompletionResponse(id=request_id, model=model, created=created, choices=choices,
                              usage=usage(gen))


def completion_chunk(request_id: str, model: str, created: int, gen: Generation,
                     moved: list[int], prompt_texts: list[str], cursor: LogprobCursor,
                     echoed: set[int]) -> CompletionResponse | None:
    choices = []
    n = len(gen.samples[0])
    for index in moved:
        sample = gen.choices[index]
        text = sample.take()
        if index not in echoed:
            echoed.add(index)
            text = prompt_texts[index // n] + text
        logprobs = cursor.completion(index, sample, len(prompt_texts[index // n]))
        if text or sample.finished or (logprobs and logprobs.tokens):
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=sample.finish_reason,
                                            stop_reason=sample.stop_reason))
    if not choices:
        return None
    return CompletionResponse(id=request_id, model=model, created=created, choices=choices)


def chat_response(request_id: str, model: str, gen: Generation, cursor: LogprobCursor,
                  created: int) -> ChatCompletionResponse:
    choices = [ChatChoice(index=index, message=AssistantMessage(content=sample.text),
                          logprobs=cursor.chat(index, sample), finish_reason=sample.finish_reason,
                          stop_reason=sample.stop_reason)
               for index, sample in enumerate(gen.choices)]
    return ChatCompletionResponse(id=request_id, model=model, created=created, choices=choices,
                                  usage=usage(gen))


def chat_role_chunk(request_id: str, model: str, created: int,
                    num_choices: int) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=request_id, model=model, created=created, choices=[
        ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
        for i in range(num_choices)])


def chat_chunk(request_id: str, model: str, created: int, gen: Generation, moved: list[int],
               cursor: LogprobCursor) -> ChatCompletionChunk | None:
    choices = []
    for index in moved:
        sample = gen.choices[index]
        text = sample.take()
        logprobs = cursor.chat(index, sample)
        if text or sample.finished or (logprobs and logprobs.content):
            choices.append(ChatChunkChoice(
                index=index, delta=DeltaMessage(content=text or None), logprobs=logprobs,
                finish_reason=sample.finish_reason))
    if not choices:
        return None
    return ChatCompletionChunk(id=request_id, model=model, created=created, choices=choices)
