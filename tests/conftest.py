"""Shared fixtures: tiny random checkpoints of each architecture, saved by transformers.

Hugging Face transformers is the independent reference: the same checkpoint directory is
loaded by HF (the oracle) and by raysvc (under test).
"""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores, shared with Ray workers and other processes: one intra-op thread avoids
# OpenMP threads spinning against each other (a 100x slowdown on tiny matmuls).
torch.set_num_threads(1)

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from raysvc.engine.llm_engine import LLMEngine  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": lambda **kw: LlamaConfig(**{**BASE, **kw}),
    "llama3-rope": lambda **kw: LlamaConfig(**{**BASE, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**BASE, "sliding_window": None, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**BASE, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**BASE, "head_dim": 32, **kw}),
}


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in a second on a little English, with bos/eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The list type is a mutable sequence. Lists may be constructed in several ways.",
            "Stop strings end the text; the returned text never contains them. héllo wörld ☃",
            "def f(x):\n    return x * 2  # doubles"] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(arch, seed=0, tokenizer=True, **config) -> (path, hf_model)."""
    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0, tokenizer: bool = True, shard: bool = False,
             dtype: torch.dtype = torch.float32, **overrides):
        key = (arch, seed, tokenizer, shard, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(seed)
            config = ARCHS[arch](**overrides)
            model = AutoModelForCausalLM.from_config(config).eval()
            # Random init gives near-uniform logits; widen them so greedy choices are not
            # decided by rounding noise.
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(8.0)
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            model.to(dtype).save_pretrained(path, max_shard_size="100KB" if shard else "10GB")
            if tokenizer:
                _train_tokenizer(config.vocab_size).save_pretrained(path)
            cache[key] = (str(path), model)
        return cache[key]

    return make


def fresh_ray():
    """The `ray` module with no Ray running in this process and none to join: a module's
    cluster fixture starts its own (auth off, as raysvc's entry points do)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return ray


def assert_no_leaks(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert sum(engine.block_manager.ref_counts) == 0


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate, greedy, no early stop: the oracle for raysvc's greedy tokens."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class RemoteMethod:
    """`handle.method` as Ray shows it, for in-process fakes: `.remote(...)` -> awaitable."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


def queue_channel(queue: asyncio.Queue):
    """A fake worker channel as a client reads it: an async iterator of awaitables over
    what is put in `queue` (an exception put there is raised)."""
    async def items():
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(item)
            yield fut

    return items()


def fake_exchange(acquire, release, block_size: int = 16):
    """`Router.exchange` for an in-process fake router, from its one-ticket `acquire(ticket_id,
    num_prompt_tokens, n, request)` (returns a Ticket or raises) and `release(ticket_id)`."""
    from raysvc.cluster.messages import ExchangeReply

    async def exchange(client_id, acquires, releases, wait_s=0.0):
        reply = ExchangeReply("fake", block_size=block_size)
        for ticket_id in releases:
            await release(ticket_id)
        for req in acquires:
            try:
                ticket = await acquire(req.ticket_id, req.num_prompt_tokens, req.n, req)
            except Exception as e:
                reply.results.append((req.ticket_id, e))
                continue
            reply.results.append((req.ticket_id, ticket.worker_id))
            reply.handles[ticket.worker_id] = ticket.worker
        if not (acquires or releases) and wait_s:
            await asyncio.sleep(min(wait_s, 0.05))
        return reply

    return exchange


def fake_submit_many(submit):
    """`LLMWorker.submit_many` for an in-process fake worker, from its `submit`."""
    async def submit_many(channel_id, batch):
        out = []
        for item in batch:
            try:
                await submit(channel_id, *item)
                out.append(None)
            except Exception as e:
                out.append(e)
        return out

    return submit_many


def make_adapter(hf, path: Path, rank: int, alpha: int, targets: list[str], rslora: bool,
                 seed: int) -> Path:
    """A PEFT adapter with random A and B (PEFT starts B at zero: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(path)
    return path
