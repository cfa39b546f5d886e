"""The Llama-family forward pass over a flat batch of tokens and the paged KV pool.

Tokens of every scheduled sequence are concatenated (no padding): prefill chunks and
decodes share one matmul per weight. Attention is the only per-sequence operation and
goes through the paged pool via an `AttentionBackend`.

Weights are fused at load time (q|k|v and gate|up) so each layer runs four matmuls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from raysvc.models.attention import AttentionBackend, AttentionMetadata
from raysvc.models.config import ModelConfig
from raysvc.models.rope import RotaryEmbedding

if TYPE_CHECKING:
    from raysvc.models.lora import LoRABatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As Hugging Face does: normalize in fp32, scale in the model's dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class LlamaLayer:
    """One decoder layer's weights; plain tensors, named after the checkpoint's."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.input_norm = weights["input_layernorm"]
        self.qkv_w = weights["qkv_proj.weight"]
        self.qkv_b = weights.get("qkv_proj.bias")
        self.o_w = weights["o_proj.weight"]
        self.o_b = weights.get("o_proj.bias")
        self.q_norm = weights.get("q_norm")
        self.k_norm = weights.get("k_norm")
        self.post_norm = weights["post_attention_layernorm"]
        self.gate_up_w = weights["gate_up_proj.weight"]
        self.gate_up_b = weights.get("gate_up_proj.bias")
        self.down_w = weights["down_proj.weight"]
        self.down_b = weights.get("down_proj.bias")


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,  # [vocab_size, hidden_size]
        layers: list[LlamaLayer],
        final_norm: torch.Tensor,  # [hidden_size]
        lm_head: torch.Tensor,  # [vocab_size, hidden_size]; `embed` itself when tied
        max_len: int,
    ) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope = RotaryEmbedding(config, max_len).to(embed.device)
        self.scale = config.head_dim**-0.5
        c = config
        self._q_size = c.num_heads * c.head_dim
        self._kv_size = c.num_kv_heads * c.head_dim

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
        meta: AttentionMetadata,
        backend: AttentionBackend,
        lora: LoRABatch | None = None,  # the step's adapters (raysvc.models.lora)
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        c = self.config
        h = F.embedding(input_ids, self.embed)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches,
                                                            strict=True)):
            residual = h
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            if lora is None:
                qkv = F.linear(x, layer.qkv_w, layer.qkv_b)
            else:
                qkv = lora.linear("qkv", i, x, layer.qkv_w, layer.qkv_b)
            q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
            q = q.view(-1, c.num_heads, c.head_dim)
            k = k.view(-1, c.num_kv_heads, c.head_dim)
            v = v.view(-1, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q, k = self.rope(positions, q, k)
            backend.store_kv(k, v, k_cache, v_cache, meta)
            o = backend.attend(q, k, v, k_cache, v_cache, meta, self.scale)
            o = o.reshape(-1, self._q_size)
            if lora is None:
                out = F.linear(o, layer.o_w, layer.o_b)
            else:
                out = lora.linear("o", i, o, layer.o_w, layer.o_b)
            h = residual + out

            residual = h
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            if lora is None:
                gate_up = F.linear(x, layer.gate_up_w, layer.gate_up_b)
            else:
                gate_up = lora.linear("gate_up", i, x, layer.gate_up_w, layer.gate_up_b)
            gate, up = gate_up.chunk(2, dim=-1)
            x = F.silu(gate) * up
            if lora is None:
                out = F.linear(x, layer.down_w, layer.down_b)
            else:
                out = lora.linear("down", i, x, layer.down_w, layer.down_b)
            h = residual + out
        return rms_norm(h, self.final_norm, c.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(
        self, hidden: torch.Tensor  # [num_rows, hidden_size]
    ) -> torch.Tensor:  # [num_rows, vocab_size] float32
        return F.linear(hidden, self.lm_head).float()
