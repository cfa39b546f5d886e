"""Load a Llama-family checkpoint directory (config.json + safetensors) into `LlamaModel`.

Every tensor is checked against the shape the config implies, so a mismatched
checkpoint fails at load with the tensor's name instead of deep in a matmul.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from raysvc.models.config import ModelConfig
from raysvc.models.llama import LlamaLayer, LlamaModel

logger = logging.getLogger(__name__)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: {str(path)!r} holds no *.safetensors weights")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        if not file.is_file():
            raise ValueError(f"model: shard {file.name!r} listed in the index is missing")
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
              "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        if c.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (c.intermediate_size,),
                       p + "mlp.up_proj.bias": (c.intermediate_size,),
                       p + "mlp.down_proj.bias": (c.hidden_size,)}
        if c.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (c.head_dim,),
                       p + "self_attn.k_norm.weight": (c.head_dim,)}
    return shapes


def load_model(
    path: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, max_len: int
) -> LlamaModel:
    path = Path(path)
    tensors = read_tensors(path)
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise ValueError(f"model: tensor {name!r} is missing from the checkpoint")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"model: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"config implies {shape}"
            )

    def get(name: str) -> torch.Tensor:
        return tensors[name].to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return get(name) if name in tensors else None

    def cat(names: list[str]) -> torch.Tensor | None:
        parts = [maybe(n) for n in names]
        return None if parts[0] is None else torch.cat(parts).contiguous()

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        layers.append(LlamaLayer({
            "input_layernorm": get(p + "input_layernorm.weight"),
            "post_attention_layernorm": get(p + "post_attention_layernorm.weight"),
            "qkv_proj.weight": cat([attn + f"{x}_proj.weight" for x in "qkv"]),
            "qkv_proj.bias": cat([attn + f"{x}_proj.bias" for x in "qkv"]) if config.qkv_bias
            else None,
            "o_proj.weight": get(attn + "o_proj.weight"),
            "o_proj.bias": maybe(attn + "o_proj.bias") if config.o_bias else None,
            "q_norm": maybe(attn + "q_norm.weight") if config.qk_norm else None,
            "k_norm": maybe(attn + "k_norm.weight") if config.qk_norm else None,
            "gate_up_proj.weight": cat([mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
            "gate_up_proj.bias": cat([mlp + "gate_proj.bias", mlp + "up_proj.bias"])
            if config.mlp_bias else None,
            "down_proj.weight": get(mlp + "down_proj.weight"),
            "down_proj.bias": maybe(mlp + "down_proj.bias") if config.mlp_bias else None,
        }))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else get("lm_head.weight")
    final_norm = get("model.norm.weight")
    logger.info("loaded %s from %s (%d layers, %s)", config.architecture, path,
                config.num_layers, dtype)
    return LlamaModel(config, embed, layers, final_norm, lm_head, max_len)
