"""What `LLM.generate` and `AsyncEngine` hand back, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # per prompt token (None for the first): its logprob and the top alternatives
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # The request failed on its own (an exception a step raised while handling it alone):
    # it ended here, every sample "abort"; the engine and the other requests go on.
    error: str | None = None


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two delta outputs of one request (`output_kind="delta"`) as one: `b` came after."""
    by_index = {c.index: CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                          c.stop_reason,
                                          None if c.logprobs is None else list(c.logprobs),
                                          c.cumulative_logprob) for c in a.outputs}
    for c in b.outputs:
        m = by_index.get(c.index)
        if m is None:
            by_index[c.index] = c
            continue
        m.text += c.text
        m.token_ids += c.token_ids
        if c.logprobs is not None:
            m.logprobs = (m.logprobs or []) + c.logprobs
        m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
        m.cumulative_logprob = c.cumulative_logprob
    return RequestOutput(b.request_id, b.prompt, b.prompt_token_ids,
                         sorted(by_index.values(), key=lambda c: c.index), b.finished,
                         a.prompt_logprobs if a.prompt_logprobs is not None
                         else b.prompt_logprobs)
