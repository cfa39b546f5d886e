"""Response bodies and stream chunks in OpenAI's shapes, built from a finished or moving
`Generation`. Logprobs are decoded here (workers run without a tokenizer)."""

from __future__ import annotations

from raysvc.serve import tool_parsers
from raysvc.serve.detokenizer import SampleText
from raysvc.serve.generation import Generation
from raysvc.serve.planner import Plan
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
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    PromptLogprob,
    ResponseFunction,
    ResponseToolCall,
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

    def prompt(self, prompt: list[int], entries: list | None) -> CompletionLogprobs:
        """The prompt's tokens in OpenAI's completion logprobs (echo): the first token has
        no logprob (nothing came before it), then each given the ones before it."""
        out = CompletionLogprobs()
        offset = 0
        for pos, token in enumerate(prompt):
            text = self._text(token)
            entry = entries[pos] if entries is not None and pos < len(entries) else None
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry[token][0])
            top = dict(self._top(entry)) if self.top_n else {}
            top.setdefault(text, entry[token][0])
            out.top_logprobs.append(top)
        return out

    def vllm_prompt_logprobs(self, entries: list | None, asked: int | None):
        """vLLM's `prompt_logprobs`: per prompt token, {id: {logprob, rank, decoded_token}}
        for the token and its `asked` best alternatives (None for the first token)."""
        if asked is None or entries is None:
            return None
        out = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            out.append({tid: PromptLogprob(logprob=lp, rank=rank, decoded_token=self._text(tid))
                        for tid, (lp, rank) in entry.items()})
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


def completion_response(request_id: str, model: str, gen: Generation, plan: Plan,
                        cursor: LogprobCursor, created: int) -> CompletionResponse:
    choices = []
    n = len(gen.samples[0])
    for index, sample in enumerate(gen.choices):
        i = index // n
        prefix = plan.prompt_texts[i]
        logprobs = prompt_part = None
        if plan.echo_logprobs:
            prompt_part = cursor.prompt(gen.prompts[i], gen.prompt_logprobs[i])
        if plan.score_only:  # the prompt and its logprobs; the one token run is dropped
            text, logprobs, reason, stop_reason = prefix, prompt_part, "length", None
        else:
            text, reason, stop_reason = prefix + sample.text, sample.finish_reason, \
                sample.stop_reason
            logprobs = cursor.completion(index, sample, len(prefix))
            if prompt_part is not None and logprobs is not None:
                logprobs = _joined(prompt_part, logprobs)
        choices.append(CompletionChoice(
            index=index, text=text, finish_reason=reason, stop_reason=stop_reason,
            logprobs=logprobs, prompt_logprobs=cursor.vllm_prompt_logprobs(
                gen.prompt_logprobs[i], plan.prompt_logprobs)))
    return CompletionResponse(id=request_id, model=model, created=created, choices=choices,
                              usage=usage(gen))


def _joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


def completion_chunk(request_id: str, model: str, created: int, gen: Generation,
                     moved: list[int], plan: Plan, cursor: LogprobCursor,
                     echoed: set[int]) -> CompletionResponse | None:
    choices = []
    n = len(gen.samples[0])
    for index in moved:
        sample = gen.choices[index]
        text = sample.take()
        prompt_part = None
        if index not in echoed:
            echoed.add(index)
            text = plan.prompt_texts[index // n] + text
            if plan.echo_logprobs:
                prompt_part = cursor.prompt(gen.prompts[index // n],
                                            gen.prompt_logprobs[index // n])
        logprobs = cursor.completion(index, sample, len(plan.prompt_texts[index // n]))
        if prompt_part is not None and logprobs is not None:
            logprobs = _joined(prompt_part, logprobs)
        if text or sample.finished or (logprobs and logprobs.tokens):
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=sample.finish_reason,
                                            stop_reason=sample.stop_reason))
    if not choices:
        return None
    return CompletionResponse(id=request_id, model=model, created=created, choices=choices)


def chat_response(request_id: str, model: str, gen: Generation, cursor: LogprobCursor,
                  created: int, tool_parser: str | None = None) -> ChatCompletionResponse:
    choices = []
    for index, sample in enumerate(gen.choices):
        content, calls = sample.text, []
        if tool_parser is not None:
            content, calls = tool_parsers.parse(tool_parser, sample.text)
        message = AssistantMessage(content=content, tool_calls=[
            ResponseToolCall(id=c.id(request_id, index, k),
                             function=ResponseFunction(name=c.name, arguments=c.arguments))
            for k, c in enumerate(calls)])
        choices.append(ChatChoice(index=index, message=message,
                                  logprobs=cursor.chat(index, sample),
                                  finish_reason="tool_calls" if calls else sample.finish_reason,
                                  stop_reason=sample.stop_reason))
    return ChatCompletionResponse(id=request_id, model=model, created=created, choices=choices,
                                  usage=usage(gen))


def chat_role_chunk(request_id: str, model: str, created: int,
                    num_choices: int) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=request_id, model=model, created=created, choices=[
        ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
        for i in range(num_choices)])


def chat_chunk(request_id: str, model: str, created: int, gen: Generation, moved: list[int],
               cursor: LogprobCursor, tool_streams: dict[int, tool_parsers.ToolStream] | None
               = None) -> ChatCompletionChunk | None:
    choices = []
    for index in moved:
        sample = gen.choices[index]
        text = sample.take()
        logprobs = cursor.chat(index, sample)
        calls: list[DeltaToolCall] = []
        finish = sample.finish_reason
        if tool_streams is not None and tool_streams[index].named is not None:
            # a named function's answer is its arguments: they stream as they come
            stream, fragment, text = tool_streams[index], text, ""
            if fragment and not stream.calls:
                first = tool_parsers.Call(stream.named, fragment)
                stream.calls.append(first)
                calls = [DeltaToolCall(index=0, id=first.id(request_id, index, 0),
                                       type="function",
                                       function=DeltaFunction(name=first.name,
                                                              arguments=fragment))]
            elif fragment:
                calls = [DeltaToolCall(index=0, function=DeltaFunction(arguments=fragment))]
            if sample.finished and stream.calls:
                finish = "tool_calls"
        elif tool_streams is not None:  # content as it comes; a call once it is complete
            stream = tool_streams[index]
            before = len(stream.calls)
            text, done = stream.feed(text)
            if sample.finished:
                rest, more = stream.finish()
                text, done = text + rest, done + more
            calls = [DeltaToolCall(index=before + k, id=c.id(request_id, index, before + k),
                                   type="function",
                                   function=DeltaFunction(name=c.name, arguments=c.arguments))
                     for k, c in enumerate(done)]
            if sample.finished and stream.calls:
                finish = "tool_calls"
        if text or calls or sample.finished or (logprobs and logprobs.content):
            choices.append(ChatChunkChoice(
                index=index, delta=DeltaMessage(content=text or None, tool_calls=calls or None),
                logprobs=logprobs, finish_reason=finish))
    if not choices:
        return None
    return ChatCompletionChunk(id=request_id, model=model, created=created, choices=choices)
