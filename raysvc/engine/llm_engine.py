"""One engine on one device: requests in, tokens out, one `step()` at a time.

`step()` = schedule -> run the model over the flat batch -> sample one token for every
sequence that caught up -> detokenize, check stop conditions, free finished sequences.
No Ray and no asyncio here; `AsyncEngine` and the worker actor wrap it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch

from raysvc.engine.block_manager import BlockManager, KVEventBatch
from raysvc.engine.config import EngineConfig
from raysvc.engine.detokenizer import detokenize_step, find_stop_string, visible_end
from raysvc.engine.host_tier import HostTier
from raysvc.engine.kv_cache import KVCache, plan_num_blocks
from raysvc.engine.kv_transfer import (
    SequenceKV,
    carry_sequence,
    export_blocks,
    export_sequence,
    import_blocks,
    write_carried,
)
from raysvc.engine.loading import (
    draft_dtype,
    eos_token_ids,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from raysvc.engine.model_runner import ModelRunner, warm_up
from raysvc.engine.outputs import CompletionOutput, RequestOutput
from raysvc.engine.sampler import Sampler, process, top_logprobs
from raysvc.engine.sampling_params import SamplingParams
from raysvc.engine.scheduler import Scheduler
from raysvc.engine.sequence import Request, Sequence
from raysvc.models.attention import make_backend
from raysvc.models.config import ModelConfig, parse_dtype
from raysvc.models.loader import load_model
from raysvc.models.lora import LoRARegistry, LoRARequest, LoRASlots

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, proposer=None) -> None:
        """`proposer`: a speculative proposer built outside the engine (the draft-model
        actor pool of raysvc.cluster); otherwise `speculative_config` builds one here."""
        self.config = config
        model_path = resolve_model_path(config.model)
        self.model_path = model_path
        self.model_config = mc = ModelConfig.from_dir(model_path)
        self.device = resolve_device(config.device)
        self.dtype = parse_dtype(config.dtype, mc.dtype)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(
            Path(config.tokenizer) if config.tokenizer else model_path)
        self.eos_token_ids = eos_token_ids(model_path, mc, self.tokenizer)

        max_len = config.max_model_len or mc.max_position_embeddings
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len: {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({mc.max_position_embeddings})")
        if mc.sliding_window and max_len > mc.sliding_window:
            logger.warning("max_model_len capped to the sliding window (%d): sliding-window "
                           "attention is not implemented", mc.sliding_window)
            max_len = mc.sliding_window

        model = load_model(model_path, mc, self.dtype, self.device, max_len)
        # before the KV pool is sized: the adapters' device stacks take memory too
        lora_slots = LoRASlots(mc, model.layers, config.max_loras, config.max_lora_rank,
                               self.dtype, self.device) if config.enable_lora else None
        backend = make_backend(config.attention_backend, self.device)
        # Room for the step's activations: logits of every sequence plus hidden states.
        reserve = config.max_num_batched_tokens * mc.hidden_size * 64 + \
            config.max_num_seqs * mc.vocab_size * 8
        num_blocks = plan_num_blocks(
            mc, self.dtype, self.device, config.block_size, config.num_kv_blocks,
            config.kv_cache_memory_bytes, config.gpu_memory_utilization, reserve,
        )
        if num_blocks * config.block_size < max_len:
            logger.warning("max_model_len capped to the KV pool's %d tokens",
                           num_blocks * config.block_size)
            max_len = num_blocks * config.block_size
        self.max_model_len = max_len

        kv_cache = KVCache(mc, num_blocks, config.block_size, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   config.max_loras if config.enable_lora else 0)
        self.runner = ModelRunner(model, kv_cache, backend)
        self.runner.lora_slots = lora_slots
        offload = config.kv_offload_bytes
        if offload is None:
            offload = 4 << 30 if self.device.type == "cuda" else 0
        if offload and config.enable_prefix_caching:
            self.block_manager.host = HostTier(kv_cache.data, offload)
        self.loras: LoRARegistry | None = None
        if config.enable_lora:
            self.loras = LoRARegistry(mc, config.max_lora_rank,
                                      config.max_cpu_loras or config.max_loras, self.dtype,
                                      config.lora_modules)
        if self.runner.backend.name == "triton" and self.device.type == "cuda":
            warm_up(self.runner, self.block_manager,
                    min(config.max_num_batched_tokens, self.max_model_len))
        self.sampler = Sampler(mc.vocab_size, self.device, config.seed)
        self.spec = build_speculative_decoder(config.speculative_config, self, proposer)
        if self.runner.backend.name == "triton" and self.device.type == "cuda" and \
                not config.enforce_eager:
            # decode steps, and verification steps of k = 1 .. k_max proposals per sequence
            k_max = self.spec.config.num_speculative_tokens if self.spec is not None else 0
            self.runner.capture_graphs(min(config.max_num_seqs, 256), self.max_model_len,
                                       tuple(range(1, k_max + 2)))
            if self.spec is not None:
                self.spec.uniform = True
        self.grammars = None  # a GrammarCompiler, made on the first structured request
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_computed_tokens = 0
        self.num_steps = 0
        self.num_failed_requests = 0  # ended by an exception of their own inside a step
        self.kv_blocks_exported = 0  # prefix blocks sent to / taken from other engines
        self._kv_batches = 0  # KV event batches published
        self.kv_blocks_imported = 0
        self.num_migrated_out = 0  # requests that left with their KV (migrate_out)
        self._grammars_lock = threading.Lock()
        self._kv_event_subscribers: list[Callable[[KVEventBatch], None]] = []

    # -- requests --------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
        resume_kv: SequenceKV | None = None,
    ) -> None:
        """Validate and enqueue; a bad request raises ValueError and leaves no trace.

        `priority` (vLLM's: lower first) orders the waiting queue and picks preemption
        victims; equal priorities keep arrival order. `lora_request` (or
        `params.lora_name`, an adapter known already) runs the request with that adapter.
        `resume_kv`: the KV of a sequence migrated off another engine (`migrate_out`)
        whose tokens start this prompt: they are not recomputed here."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: expected an integer, got {priority!r}")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params)}")
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if lora_request is not None:
            self.add_lora(lora_request)
            params = params.model_copy(update={"lora_name": lora_request.lora_name})
        if params.lora_name is not None and self.loras is None:
            raise ValueError(f"lora_name: {params.lora_name!r} needs an engine started with "
                             f"enable_lora=True")
        token_ids = self.tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate within "
                             f"max_model_len={self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and this model has none")
        self._check_logits_params(params)
        grammar = self._compile(params)
        text = prompt if isinstance(prompt, str) else None
        request = Request(request_id, text, token_ids, params, self.eos_token_ids, priority)
        if params.bad_words:
            request.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        if grammar is not None:
            request.grammar = grammar
            matcher = request.seqs[0].matcher = self.grammars.matcher(grammar)
            done = params.continued_output_tokens
            if done > len(token_ids) - 1 or not all(
                    matcher.accept_token(t) for t in token_ids[len(token_ids) - done:]):
                raise ValueError("continued_output_tokens: the prompt's last "
                                 f"{done} tokens are not a start of its structured output")
        if resume_kv is not None:
            if params.n != 1:
                raise ValueError("resume_kv: a migrated sequence continues as one sample (n=1)")
            carried = carry_sequence(self, resume_kv, token_ids)
            if params.prompt_logprobs is None:  # else every prompt position is computed
                request.seqs[0].carried_kv = carried
        if params.lora_name is not None:
            # ValueError if unknown or unloadable
            request.lora = self.loras.acquire(params.lora_name)
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        self.num_prompt_tokens += len(token_ids)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Know (and load) an adapter; vLLM's `add_lora`. ValueError names the file."""
        if self.loras is None:
            raise ValueError(f"lora_request: adapter {lora_request.lora_name!r} needs an "
                             f"engine started with enable_lora=True")
        if self.loras.paths.get(lora_request.lora_name) != str(lora_request.lora_path):
            self.loras.add(lora_request.lora_name, lora_request.lora_path, replace=True)

    def remove_lora(self, lora_name: str) -> None:
        """Forget an adapter (KeyError if unknown): new requests may no longer name it;
        requests running with it finish with it."""
        if self.loras is None:
            raise KeyError(lora_name)
        self.loras.remove(lora_name)

    def export_kv(self, block_hashes: list[bytes]):
        """The KV of the longest leading run of `block_hashes` held here, as a `KVBlocks`
        (raysvc.engine.kv_transfer), or None."""
        kv = export_blocks(self, block_hashes)
        self.kv_blocks_exported += kv.num_blocks if kv is not None else 0
        return kv

    def import_kv(self, kv) -> int:
        """Register a `KVBlocks` from another engine of this model in the prefix cache;
        how many blocks were new here. ValueError if it is not for this model, dtype,
        block size and layout."""
        n = import_blocks(self, kv)
        self.kv_blocks_imported += n
        self._publish_kv_events()
        return n

    def migrate_out(self, request_ids: list[str]) -> tuple[dict[str, SequenceKV], list[str]]:
        """Take requests off this engine with their KV, to continue elsewhere (a draining
        worker's live migration). A request of one sample that has computed something
        leaves with its `SequenceKV` and is gone from here (its blocks freed); one that
        has computed nothing (never started, or preempted) is listed second: it has no KV
        to move. Others (n > 1) stay."""
        moved: dict[str, SequenceKV] = {}
        nothing: list[str] = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.params.n != 1 or len(request.seqs) != 1:
                continue
            seq = request.seqs[0]
            kv = export_sequence(self, seq) if not seq.is_finished else None
            if kv is None:
                nothing.append(request_id)
                continue
            moved[request_id] = kv
            self.abort(request_id)
            self.num_migrated_out += 1
        return moved, nothing

    def loaded_loras(self) -> list[str]:
        """The adapters in host memory now (safe to read from another thread)."""
        return list(self.loras.names) if self.loras is not None else []

    def lora_modules(self) -> dict[str, str]:
        """Every adapter requests may name, -> its directory (safe from another thread)."""
        return dict(self.loras.known) if self.loras is not None else {}

    def _forget(self, request: Request) -> None:
        """The request is over: it no longer holds its adapter."""
        del self.requests[request.request_id]
        if request.params.lora_name is not None:
            self.loras.release(request.params.lora_name)

    def _check_logits_params(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {vocab})")
        for name in ("bad_words", "structured_outputs"):
            if getattr(params, name) and self.vocabulary is None:
                raise ValueError(f"{name}: needs a tokenizer, and this model has none")

    @cached_property
    def vocabulary(self):
        """The tokenizer grammars and bad words are read with: the engine's, or, where
        the engine leaves text to its caller (skip_tokenizer_init, as a worker does), one
        loaded for this on first use."""
        if self.tokenizer is not None:
            return self.tokenizer
        return load_tokenizer(Path(self.config.tokenizer or self.model_path))

    def _compile(self, params: SamplingParams):
        """The request's grammar, compiled (cached per constraint); ValueError naming the
        field when the constraint is malformed. Thread-safe (`AsyncEngine` calls it off
        the step thread first)."""
        if params.structured_outputs is None:
            return None
        with self._grammars_lock:
            if self.grammars is None:
                from raysvc.engine.structured_output import GrammarCompiler

                self.grammars = GrammarCompiler(self.vocabulary, self.model_config.vocab_size,
                                                self.eos_token_ids)
        return self.grammars.compile(params.structured_outputs)

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as it would be tokenized alone and after a space (vLLM's rule)."""
        found: list[list[int]] = []
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = self.vocabulary.encode(text, add_special_tokens=False)
                if ids and ids not in found:
                    found.append(ids)
        return found

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.model_config.vocab_size})")
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt: is empty")
        return token_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any moment; its blocks are freed at once."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._forget(request)
        self.scheduler.abort(request)
        if self.spec is not None:
            for seq in request.seqs:
                self.spec.release(seq)
        return self._output(request)

    def finish_sample(self, request_id: str, index: int, reason: str = "stop",
                      stop_reason: int | str | None = None) -> RequestOutput | None:
        """End one sample of a request now (an ingress saw its stop string), freeing its
        blocks; the request's other samples go on. None if there is no such sample."""
        request = self.requests.get(request_id)
        seq = next((s for s in request.seqs if s.index == index), None) if request else None
        if seq is None or seq.is_finished:
            return None
        self.scheduler.stop(seq, reason, stop_reason)
        if self.spec is not None:
            self.spec.release(seq)
        if request.finished:
            self._forget(request)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step --------------------------------------------------------------------

    def subscribe_kv_events(self, callback: Callable[[KVEventBatch], None]) -> None:
        """Call `callback` after every step that stored or evicted prefix-cache blocks.

        Replaying the batches in order (stored: add the hashes, removed: drop them)
        reproduces exactly the set of block hashes this engine holds.
        """
        self._kv_event_subscribers.append(callback)

    def cached_block_hashes(self) -> set[bytes]:
        return set(self.block_manager.cached)

    def not_started(self, limit: int) -> list[str]:
        """Up to `limit` waiting requests that have computed and produced nothing yet,
        the newest first (they would wait longest): what a worker can give away to another
        for free (rebalancing)."""
        out: list[str] = []
        for seq in reversed(self.scheduler.waiting):
            request = seq.request
            if len(out) >= limit:
                break
            if (seq.num_computed_tokens == 0 and len(request.seqs) == 1
                    and seq.num_tokens == len(request.prompt_token_ids)):
                out.append(request.request_id)
        return out

    def step(self) -> list[RequestOutput]:
        try:
            return self._step()
        finally:
            if self.spec is not None:
                self.spec.end_step()
            self.num_steps += 1
            self._publish_kv_events()

    def _publish_kv_events(self) -> None:
        """Hand the prefix cache's changes to the subscribers, numbered in order (a step's,
        or an import's between steps)."""
        events = self.block_manager.drain_events()
        if events:
            self._kv_batches += 1
            batch = KVEventBatch(self._kv_batches, events)
            for callback in self._kv_event_subscribers:
                callback(batch)

    def _step(self) -> list[RequestOutput]:
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, self.max_model_len)
        draft_done = time.perf_counter()  # a proposer's last act is reading tokens: synced
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return []
        for seq, first in batch.carried:
            write_carried(self, seq, first)
        if self.loras is not None:
            self.runner.order_by_adapter(batch)

        step = self.runner.prepare(batch)
        plan = step.logits
        # grammar masks: filled on a host thread while the forward pass runs
        masks = [(row, s.matcher, []) for s, row in plan.sampling if s.matcher is not None]
        masks += [(row, item.seq.matcher, item.spec_token_ids) for item, row in plan.speculating
                  if item.seq.matcher is not None]
        filled = self.grammars.fill(len(plan.indices), masks) if masks else None
        logits = self.runner.execute(step)
        if filled is not None:
            self.grammars.apply(logits, filled)
        for item in batch.scheduled:
            if not item.num_spec:
                item.seq.num_computed_tokens += item.num_tokens
                self.block_manager.cache_full_blocks(item.seq)
        self.num_computed_tokens += batch.num_tokens
        if plan.prompt_rows:
            self._record_prompt_logprobs(logits, plan.prompt_rows)

        seqs, rows = [], []
        for seq, row in plan.sampling:
            seqs.append(seq)
            rows.append(row)
            if seq.request.fork_pending:
                for child in self._fork(seq):
                    seqs.append(child)
                    rows.append(row)
        touched: dict[str, Request] = {}
        failed: dict[str, RequestOutput] = {}
        if seqs:
            result = self.sampler(logits[rows], seqs)
            for i, (seq, token, lps) in enumerate(
                    zip(seqs, result.token_ids, result.logprobs, strict=True)):
                if seq.request.request_id in failed:
                    continue
                try:
                    if i in result.failed:
                        raise result.failed[i]
                    self._append_token(seq, token, lps)
                except Exception as e:
                    self._fail(seq.request, e, failed)
                    continue
                touched[seq.request.request_id] = seq.request
        # the forward pass belongs to the step, not to verification: if nothing was sampled
        # (which waits for the logits), wait for it here
        verify_start = self._now() if plan.speculating and not seqs else time.perf_counter()
        for item, row in plan.speculating:
            seq = item.seq
            if seq.request.request_id in failed:
                continue
            try:
                self._verify(seq, item.num_spec, logits[row: row + item.num_spec + 1])
            except Exception as e:
                self._fail(seq.request, e, failed)
                continue
            touched[seq.request.request_id] = seq.request
        if self.spec is not None:
            end = time.perf_counter()  # verification read its logits on the host: synced
            self.spec.observe_step(batch.num_tokens, verify_start - draft_done,
                                   len(plan.speculating), end - verify_start)

        outputs = list(failed.values())
        for request in touched.values():
            if request.request_id in failed:
                continue
            out = self._output(request)
            if out is not None:
                outputs.append(out)
            if request.finished:
                self._forget(request)
        return outputs

    def _verify(self, seq: Sequence, num_spec: int, rows: torch.Tensor) -> None:
        """Rejection-sample `seq`'s proposals against its k + 1 target rows; append what
        was accepted."""
        if seq.request.params.needs_processing:
            rows = rows.float().clone()
            process(rows, seq)
        tokens = self.spec.verify(seq, num_spec, rows, self.sampler)
        # KV is valid for the last known token and the accepted proposals only
        seq.num_computed_tokens += len(tokens)
        self.block_manager.truncate(seq)
        for token in tokens:
            self._append_token(seq, token, None)
            if seq.is_finished:
                break
        else:
            self.block_manager.cache_full_blocks(seq)

    def _fail(self, request: Request, error: BaseException,
              failed: dict[str, RequestOutput]) -> None:
        """`request` alone raised inside the step (sampling, stop checks, verification):
        end it as aborted with the error, free its blocks, and let the step go on for the
        others. The batch-wide forward pass is not attributed to a request: an error there
        still stops the engine."""
        logger.error("request %s failed inside a step; aborting it alone: %r",
                     request.request_id, error, exc_info=error)
        out = self.abort(request.request_id)
        if out is not None:
            out.finished = True
            out.error = f"{type(error).__name__}: {error}"
            failed[request.request_id] = out
        self.num_failed_requests += 1

    def _now(self) -> float:
        """A timestamp that includes the device work queued so far (speculation's cost
        model must not see a forward pass as free because its kernels run async)."""
        if self.spec is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _record_prompt_logprobs(self, logits: torch.Tensor,
                                rows: list[tuple[Request, int, int]]) -> None:
        """Position i's logits score prompt token i + 1 (a recomputation adds nothing)."""
        logprobs = torch.log_softmax(logits[[r for _, _, r in rows]].float(), dim=-1).cpu()
        for (request, pos, _), row in zip(rows, logprobs, strict=True):
            if len(request.prompt_logprobs) != pos + 1:
                continue
            token = request.prompt_token_ids[pos + 1]
            entry = top_logprobs(row[: self.model_config.vocab_size], token,
                                  request.params.prompt_logprobs)
            if self.tokenizer is not None:
                for tid, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([tid])
            request.prompt_logprobs.append(entry)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Split a request into its n samples once its prompt is computed."""
        request = parent.request
        request.fork_pending = False
        children = []
        for index in range(1, request.params.n):
            child = Sequence(request, index, parent=parent)
            if request.grammar is not None:
                child.matcher = self.grammars.matcher(request.grammar)
            self.block_manager.fork(parent, child)
            self.scheduler.add_forked(child)
            request.seqs.append(child)
            children.append(child)
        return children

    def _append_token(self, seq: Sequence, token: int, logprobs) -> None:
        params = seq.request.params
        seq.token_ids.append(token)
        self.num_generated_tokens += 1
        if logprobs is not None:
            if self.tokenizer is not None:
                for tid, lp in logprobs.items():
                    lp.decoded_token = self.tokenizer.decode([tid])
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        delta = detokenize_step(self.tokenizer, seq) if self.tokenizer is not None else ""
        may_stop = seq.num_output_tokens >= params.min_tokens
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            logger.warning("request %s: token %d breaks its grammar; the sample ends",
                           seq.request.request_id, token)
            seq.finish("stop")
        elif may_stop and token in seq.request.stop_token_ids:
            seq.finish("stop", token if token in params.stop_token_ids else None)
        elif may_stop and delta and params.stop and (stop := find_stop_string(seq, len(delta))):
            seq.finish("stop", stop)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")
        elif seq.matcher is not None and seq.matcher.is_terminated():
            seq.finish("stop")  # the grammar is complete and took a stop token
        if seq.is_finished:
            self.scheduler.finish(seq)
            if self.spec is not None:
                self.spec.release(seq)

    def _output(self, request: Request) -> RequestOutput | None:
        """The request's output after this step, in its `output_kind`: everything so far
        (cumulative), only what is new (delta: each token and character is handed out
        once, so a stream costs O(its length)), or nothing until it finished."""
        kind = request.params.output_kind
        if kind == "final_only" and not request.finished:
            return None
        delta = kind == "delta"
        outs = []
        for s in sorted(request.seqs, key=lambda s: s.index):
            end = visible_end(s)
            first = s.num_prompt_tokens + (s.num_emitted if delta else 0)
            logprobs = None
            if s.logprobs is not None:
                logprobs = s.logprobs[s.num_emitted:] if delta else list(s.logprobs)
            outs.append(CompletionOutput(
                index=s.index, text=s.text[s.emitted_chars if delta else 0:end],
                token_ids=s.token_ids[first:], finish_reason=s.finish_reason,
                stop_reason=s.stop_reason, logprobs=logprobs,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None))
            if delta:
                s.num_emitted, s.emitted_chars = s.num_output_tokens, end
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None:
            complete = len(prompt_logprobs) == len(request.prompt_token_ids)
            if delta and (request.prompt_logprobs_sent or not complete):
                prompt_logprobs = None  # a delta output carries them once, complete
            else:
                prompt_logprobs = list(prompt_logprobs)
                request.prompt_logprobs_sent = delta
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             finished=request.finished, prompt_logprobs=prompt_logprobs)

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_failed_requests": self.num_failed_requests,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "num_computed_tokens": self.num_computed_tokens,
            "prefix_cache_queries": self.scheduler.prefix_cache_queries,
            "prefix_cache_hits": self.scheduler.prefix_cache_hits,
            "kv_blocks_cached": bm.num_cached_free,
            "kv_blocks_exported": self.kv_blocks_exported,
            "kv_blocks_imported": self.kv_blocks_imported,
            # live migration: requests that left with their KV, tokens that came with one
            "num_migrated_out": self.num_migrated_out,
            "kv_tokens_carried": self.scheduler.carried_tokens,
            # the host tier: prefix tokens it gave back for hits, blocks it holds now
            "prefix_cache_hits_host": bm.host.reloads * bm.block_size if bm.host else 0,
            "kv_host_blocks": bm.host.num_blocks if bm.host else 0,
            **(self.spec.stats() if self.spec is not None else {}),
        }


def build_speculative_decoder(raw: dict | None, engine: LLMEngine, proposer=None):
    if raw is None:
        if proposer is not None:
            raise ValueError("proposer: given without a speculative_config")
        return None
    from raysvc.engine.spec.config import SpeculativeConfig
    from raysvc.engine.spec.decoder import SpeculativeDecoder

    config = SpeculativeConfig.model_validate(raw)
    if proposer is not None:
        return SpeculativeDecoder(config, proposer)
    if config.method == "ngram":
        from raysvc.engine.spec.ngram import NgramProposer

        proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        return SpeculativeDecoder(config, proposer)
    from raysvc.engine.spec.draft_model import DraftModelProposer

    ec = engine.config
    proposer = DraftModelProposer(
        resolve_model_path(config.model or "tiny-draft"),
        draft_dtype(engine.dtype, engine.device), engine.device,
        engine.runner.backend, ec.block_size, engine.max_model_len,
        capacity_tokens=min(ec.max_num_seqs, 64) * (engine.max_model_len + 16),
        target_vocab=engine.model_config.vocab_size,
        max_graph_seqs=0 if ec.enforce_eager else min(ec.max_num_seqs, 128),
    )
    return SpeculativeDecoder(config, proposer)
