"""One HTTP request's generation: its prompts through the cluster, its samples' texts.

A completions request may carry several prompts, each with `n` samples; choice
`i * n + j` is sample j of prompt i (OpenAI's numbering). Each prompt is one cluster
request; their streams are merged. After every worker chunk the caller gets the choice
indices that moved. A sample that hits a stop string is done here and is ended on its worker
too (`ClusterClient.finish_sample`), so it stops holding a batch slot and KV blocks; when
every sample of a prompt is done, the prompt's stream is closed, which aborts it on its
worker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from raysvc.cluster.client import ClusterClient, merge_streams
from raysvc.serve.detokenizer import SampleText


@dataclass(slots=True)
class Timing:
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_chunk: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds, tokens)

    def chunk(self, num_tokens: int) -> None:
        now = time.monotonic()
        if num_tokens and self.first_token is None:
            self.first_token = now
        elif num_tokens and self.last_chunk is not None:
            self.gaps.append((now - self.last_chunk, num_tokens))
        if num_tokens:
            self.last_chunk = now


class Generation:
    def __init__(self, client: ClusterClient, request_id: str, prompts: list[list[int]],
                 engine_params: dict[str, Any], samples: list[list[SampleText]]) -> None:
        self.client = client
        self.request_id = request_id
        self.prompts = prompts
        self.engine_params = engine_params
        self.samples = samples  # [prompt][sample]
        self.timing = Timing()
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)
        self.score_only = False  # max_tokens 0: the one generated token is not reported
        self.priority, self.tenant = 0, ""  # scheduling: see ClusterClient.generate

    @property
    def choices(self) -> list[SampleText]:
        return [s for per_prompt in self.samples for s in per_prompt]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return 0 if self.score_only else sum(s.num_output_tokens for s in self.choices)

    async def stream(self) -> AsyncIterator[list[int]]:
        """Yield the choice indices that moved, after every worker chunk, until all end."""
        if len(self.prompts) == 1:
            inner = self._run_prompt(0)
            try:
                async for moved in inner:
                    yield moved
            finally:  # close it now (abort + release), not whenever it is collected
                await inner.aclose()
            return
        prompts = [self._run_prompt(i) for i in range(len(self.prompts))]
        async for moved, _ in merge_streams(prompts):
            yield moved

    async def _run_prompt(self, i: int) -> AsyncIterator[list[int]]:
        samples = self.samples[i]
        n = len(samples)
        request_id = f"{self.request_id}-{i}"
        stream = self.client.generate(request_id, self.prompts[i], self.engine_params, n,
                                      priority=self.priority, tenant=self.tenant)
        try:
            async for chunk in stream:
                if chunk.prompt_logprobs is not None and self.prompt_logprobs[i] is None:
                    self.prompt_logprobs[i] = chunk.prompt_logprobs
                moved, tokens = [], 0
                for delta in chunk.deltas:
                    sample = samples[delta.index]
                    if sample.finished:
                        continue
                    # a stop token (EOS, stop_token_ids) ends the text; it is not part of it
                    stop_token = (delta.finish_reason == "stop" and delta.token_ids
                                  and not isinstance(delta.stop_reason, str))
                    sample.add(delta.token_ids, delta.logprobs, hide_last=bool(stop_token))
                    tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        sample.finish(delta.finish_reason, delta.stop_reason)
                    elif sample.finished and n > 1:  # a stop string, found here
                        self.client.finish_sample(request_id, delta.index)
                    moved.append(i * n + delta.index)
                self.timing.chunk(tokens)
                if moved:
                    yield moved
                if all(s.finished for s in samples):
                    return
            for sample in samples:  # a stream that ended early (aborted at the worker)
                sample.finish("abort")
        finally:
            await stream.aclose()
