"""N-gram prompt lookup: propose what followed the last n tokens the previous time they
appeared in the sequence (prompt or output). No model: free proposals for text that
repeats its context (code edits, extraction, summaries quoting the source)."""

from __future__ import annotations

from raysvc.engine.sequence import Sequence
from raysvc.engine.spec.proposal import Proposal


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal | None]:
        return [self._lookup(seq.token_ids, k) for seq, k in zip(seqs, ks, strict=True)]

    def _lookup(self, tokens: list[int], k: int) -> Proposal | None:
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n:]
            # the latest earlier occurrence wins: recent context predicts best
            for start in range(length - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    follow = tokens[start + n: start + n + k]
                    if follow:
                        return Proposal(follow, None)
                    break
        return None

    def release(self, seq: Sequence) -> None:
        pass
