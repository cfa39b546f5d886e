"""A small draft model, in process, proposing k tokens per sequence per step.

It runs the same engine parts as the target (model, paged KV pool, block manager,
model runner, sampler) on its own pool. Each target sequence has a mirror here; before
proposing, the mirror is cut back to the longest prefix it shares with the target's
tokens (rolling back the KV of rejected proposals), catches up on the tokens it has not
seen, and then drafts k tokens one forward pass at a time, for all sequences together.
On CUDA the rounds after the first (one token per sequence) replay CUDA graphs
(`raysvc.engine.decode_graphs`): a small draft's round is bound by kernel launches.
"""

from __future__ import annotations

import itertools
import logging

import torch

from raysvc.engine.block_manager import BlockManager, cdiv
from raysvc.engine.kv_cache import KVCache
from raysvc.engine.model_runner import ModelRunner, warm_up
from raysvc.engine.sampler import Sampler
from raysvc.engine.scheduler import ScheduledSeq, SchedulerOutput
from raysvc.engine.sequence import Request, Sequence
from raysvc.engine.spec.proposal import Proposal
from raysvc.models.attention import AttentionBackend
from raysvc.models.config import ModelConfig
from raysvc.models.loader import load_model

logger = logging.getLogger(__name__)


class DraftModelProposer:
    def __init__(self, path, dtype: torch.dtype, device: torch.device, backend: AttentionBackend,
                 block_size: int, max_len: int, capacity_tokens: int, target_vocab: int,
                 max_graph_seqs: int = 128) -> None:
        """`max_graph_seqs`: the largest batch a CUDA graph covers (0: none, always eager)."""
        self.config = ModelConfig.from_dir(path)
        if self.config.vocab_size != target_vocab:
            raise ValueError(f"speculative_config.model: the draft's vocab_size "
                             f"({self.config.vocab_size}) differs from the target's "
                             f"({target_vocab}); they must share a tokenizer")
        model = load_model(path, self.config, dtype, device, max_len)
        num_blocks = cdiv(capacity_tokens, block_size)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, KVCache(self.config, num_blocks, block_size, dtype,
                                                 device), backend)
        if backend.name == "triton" and device.type == "cuda":
            warm_up(self.runner, self.block_manager, min(capacity_tokens, max_len, 1024))
            if max_graph_seqs > 0:  # rounds of 1 token, and the 2-token catch-up (below)
                self.runner.capture_graphs(max_graph_seqs, max_len, (1, 2))
        self.sampler = Sampler(self.config.vocab_size, device)
        self.mirrors: dict[int, Sequence] = {}  # target seq_id -> draft-side sequence

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal | None]:
        active = [(seq, self._sync(seq)) for seq in seqs]
        active = [(seq, m) for seq, m in active if m is not None]
        self._uniform_catch_up([m for _, m in active])
        drafts: dict[int, list[int]] = {seq.seq_id: [] for seq, _ in active}
        probs: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq, _ in active}
        want = {seq.seq_id: k for seq, k in zip(seqs, ks, strict=True)}
        for _ in range(max(ks, default=0)):
            active = [(s, m) for s, m in active if len(drafts[s.seq_id]) < want[s.seq_id]]
            active = [(s, m) for s, m in active if self._reserve(s, m)]
            if not active:
                break
            batch = SchedulerOutput([ScheduledSeq(m, m.num_tokens - m.num_computed_tokens)
                                     for _, m in active])
            last = list(itertools.accumulate(item.num_tokens for item in batch.scheduled))
            logits = self.runner.execute(self.runner.prepare(batch, [end - 1 for end in last]))
            for item in batch.scheduled:
                item.seq.num_computed_tokens += item.num_tokens
            mirrors = [m for _, m in active]
            greedy = [m.request.params.greedy for m in mirrors]
            tokens = logits.argmax(dim=-1)
            sampled = [i for i, g in enumerate(greedy) if not g]
            if sampled:
                p = self.sampler.probabilities(logits[sampled],
                                               [mirrors[i].request.params for i in sampled])
                tokens[sampled] = self.sampler.draw(p, [mirrors[i] for i in sampled])
                for row, i in enumerate(sampled):
                    probs[active[i][0].seq_id].append(p[row])
            for (seq, m), token in zip(active, tokens.tolist(), strict=True):
                m.token_ids.append(token)
                drafts[seq.seq_id].append(token)
        out: list[Proposal | None] = []
        for seq in seqs:
            tokens = drafts.get(seq.seq_id)
            if not tokens:
                out.append(None)
                continue
            q = torch.stack(probs[seq.seq_id]) if probs[seq.seq_id] else None
            out.append(Proposal(tokens, q))
        return out

    def _uniform_catch_up(self, mirrors: list[Sequence]) -> None:
        """In steady state a mirror is 1 token behind (a proposal was rejected: the target's
        token replaces it) or 2 (all accepted: the last proposal and the bonus token). With
        CUDA graphs, recompute one known token for those 1 behind — it rewrites identical
        K/V — so that the first round is uniform and replays a graph too."""
        graphs = self.runner.graphs
        if graphs is None or 2 not in graphs.query_lens:
            return
        behind = [m.num_tokens - m.num_computed_tokens for m in mirrors]
        if not behind or max(behind) != 2 or min(behind) < 1:
            return
        if any(n == 1 and m.num_computed_tokens == 0 for m, n in zip(mirrors, behind, strict=True)):
            return
        for m, n in zip(mirrors, behind, strict=True):
            if n == 1:
                m.num_computed_tokens -= 1

    def _sync(self, seq: Sequence) -> Sequence | None:
        """Cut the mirror back to what it shares with the target sequence, then extend it."""
        m = self.mirrors.get(seq.seq_id)
        if m is None:
            req = Request(seq.request.request_id, None, seq.token_ids[:seq.num_prompt_tokens],
                          seq.request.params, ())
            m = req.seqs[0]
            # its own stream: the draft's draws must not consume the target sequence's
            seed = seq.request.params.seed
            m.generator = None if seed is None else torch.Generator().manual_seed(
                (seed * 1_000_003 + seq.index + 1) % 2**63)
            self.mirrors[seq.seq_id] = m
        common = 0
        limit = min(m.num_computed_tokens, seq.num_tokens)
        while common < limit and m.token_ids[common] == seq.token_ids[common]:
            common += 1
        m.num_computed_tokens = common
        self.block_manager.truncate(m)
        m.token_ids = list(seq.token_ids)
        return m

    def _reserve(self, seq: Sequence, m: Sequence) -> bool:
        if self.block_manager.allocate_slots(m, m.num_tokens - m.num_computed_tokens) is not None:
            return True
        # Out of draft KV: give this mirror's blocks back; the sequence decodes plainly.
        self.release(seq)
        return False

    def release(self, seq: Sequence) -> None:
        m = self.mirrors.pop(seq.seq_id, None)
        if m is not None:
            self.block_manager.free(m)
