"""Multi-LoRA: many PEFT adapters on one base model, mixed in one step.

A LoRA adapter adds `scaling * B @ A @ x` to a linear layer's output (A: [r, in],
B: [out, r]). Serving many adapters means one batch whose rows each name their own
adapter (or none), so the base matmul runs once for everyone and only the small rank-r
products differ per row — never one engine per adapter (S-LoRA, Punica, vLLM).

Layout. The model fuses q|k|v and gate|up, so an adapter's modules are grouped the same
way: per group and layer, the active adapters' A matrices are stacked into
[max_loras, G * max_lora_rank, in] and their B matrices into a block-diagonal
[max_loras, out, G * max_lora_rank] (G = 3 for qkv, 2 for gate_up, 1 for o and down). A
group then costs one shrink (x @ A^T) and one expand (@ B^T) per adapter in the step,
whatever the adapter targets: a module it does not target is zeros. `scaling`
(lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into B at load.

Who keeps what:
- `LoRARegistry`: adapter name -> directory (from `lora_modules`, a `LoRARequest`, or a
  load at run time), and the loaded adapters in host memory, LRU-bounded by
  `max_cpu_loras` (adapters of live requests are pinned: a request never fails because
  its adapter was evicted mid-flight);
- `LoRASlots`: the device-side stacks; `activate` puts a step's adapters into slots
  (LRU among `max_loras`); the scheduler guarantees a step never needs more;
- `LoRABatch`: one step's per-token slot (-1 = the base model), applied by the model
  after each fused linear (`add`).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from raysvc.models.config import ModelConfig

# module -> (group, position in the group)
MODULES = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
           "o_proj": ("o", 0), "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1),
           "down_proj": ("down", 0)}
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
          "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: which adapter a request runs with. `lora_name` is what clients call it (the
    OpenAI `model` field); `lora_path` a local PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""


def module_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable module."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    # (layer, module) -> (A [r, in], scaling * B [out, r]), host memory, model dtype
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def load_adapter(name: str, path: str | Path, config: ModelConfig, max_lora_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read and check a PEFT LoRA directory (adapter_config.json +
    adapter_model.safetensors). Every refusal is a ValueError naming the file."""
    from safetensors import safe_open

    root = Path(path)
    cfg_file, weights_file = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not root.is_dir():
        raise ValueError(f"lora {name!r}: {str(root)!r} is not a directory")
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise ValueError(f"lora {name!r}: {f} is missing (a PEFT LoRA directory holds "
                             f"adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"lora {name!r}: {cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"lora {name!r}: {cfg_file} must hold a JSON object")

    def refuse(field: str, why: str) -> ValueError:
        return ValueError(f"lora {name!r}: {cfg_file}: {field}: {why}")

    if cfg.get("peft_type", "LORA") != "LORA":
        raise refuse("peft_type", f"{cfg.get('peft_type')!r} is not LORA")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise refuse("r", f"expected a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise refuse("r", f"rank {rank} exceeds max_lora_rank={max_lora_rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise refuse("lora_alpha", f"expected a number, got {alpha!r}")
    for field, ok in (("use_dora", not cfg.get("use_dora")),
                      ("fan_in_fan_out", not cfg.get("fan_in_fan_out")),
                      ("bias", cfg.get("bias", "none") == "none"),
                      ("rank_pattern", not cfg.get("rank_pattern")),
                      ("alpha_pattern", not cfg.get("alpha_pattern")),
                      ("modules_to_save", not cfg.get("modules_to_save")),
                      ("lora_bias", not cfg.get("lora_bias"))):
        if not ok:
            raise refuse(field, f"{cfg.get(field)!r} is not supported")
    scaling = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    shapes = module_shapes(config)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            m = _KEY.search(key)
            if m is None:
                raise ValueError(f"lora {name!r}: {weights_file}: tensor {key!r} is not a "
                                 f"LoRA A/B weight of {', '.join(MODULES)}")
            layer, module, which = int(m[1]), m[2], m[3]
            if module not in MODULES:
                raise ValueError(f"lora {name!r}: {weights_file}: tensor {key!r} targets "
                                 f"{module!r}; supported: {', '.join(MODULES)}")
            if layer >= config.num_layers:
                raise ValueError(f"lora {name!r}: {weights_file}: tensor {key!r} is for layer "
                                 f"{layer}, but the base model has {config.num_layers} "
                                 f"(an adapter of another base model?)")
            tensor = f.get_tensor(key)
            fan_in, fan_out = shapes[module]
            want = (rank, fan_in) if which == "A" else (fan_out, rank)
            if tuple(tensor.shape) != want:
                raise ValueError(f"lora {name!r}: {weights_file}: tensor {key!r} has shape "
                                 f"{tuple(tensor.shape)}, the base model and r={rank} imply "
                                 f"{want} (an adapter of another base model?)")
            parts.setdefault((layer, module), {})[which] = tensor
    if not parts:
        raise ValueError(f"lora {name!r}: {weights_file} holds no LoRA weights")
    weights = {}
    for (layer, module), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"lora {name!r}: {weights_file}: layer {layer} {module} has "
                             f"lora_{'A' if 'A' not in ab else 'B'} missing")
        b = (ab["B"].double() * scaling).to(dtype)
        weights[(layer, module)] = (ab["A"].to(dtype).contiguous(), b.contiguous())
    return LoRAAdapter(name, str(root), rank, weights)


class LoRARegistry:
    """Known adapters (name -> directory) and the loaded ones (host memory, LRU)."""

    def __init__(self, config: ModelConfig, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, modules: dict[str, str] | None = None) -> None:
        self.config = config
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.paths: dict[str, str] = {}
        self.loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.in_use: dict[str, int] = {}  # adapter -> live requests naming it
        self.num_loads = 0
        for name, path in (modules or {}).items():
            self.add(name, path)

    def add(self, name: str, path: str, load: bool = True) -> LoRAAdapter | None:
        """Register `name` (checking the directory now, so a bad one fails here)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"lora_name: expected a non-empty string, got {name!r}")
        known = self.paths.get(name)
        if known is not None and known != str(path):
            raise ValueError(f"lora_name: {name!r} is already loaded from {known!r}")
        adapter = self._load(name, str(path)) if load else None
        self.paths[name] = str(path)
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise KeyError(name)
        if self.in_use.get(name):
            raise ValueError(f"lora_name: {name!r} is in use by {self.in_use[name]} "
                             f"request(s)")
        del self.paths[name]
        self.loaded.pop(name, None)

    def acquire(self, name: str) -> LoRAAdapter:
        """The adapter for a new request (loaded now if it is not); pinned until release."""
        path = self.paths.get(name)
        if path is None:
            raise ValueError(f"lora_name: unknown adapter {name!r}; loaded: "
                             f"{', '.join(sorted(self.paths)) or 'none'}")
        adapter = self.loaded.get(name) or self._load(name, path)
        self.in_use[name] = self.in_use.get(name, 0) + 1
        return adapter

    def release(self, name: str) -> None:
        left = self.in_use.get(name, 0) - 1
        if left > 0:
            self.in_use[name] = left
        else:
            self.in_use.pop(name, None)
            self._evict()

    def get(self, name: str) -> LoRAAdapter:
        adapter = self.loaded[name]  # pinned by a live request: never evicted
        self.loaded.move_to_end(name)
        return adapter

    def _load(self, name: str, path: str) -> LoRAAdapter:
        adapter = load_adapter(name, path, self.config, self.max_lora_rank, self.dtype)
        self.loaded[name] = adapter
        self.num_loads += 1
        self._evict()
        return adapter

    def _evict(self) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_cpu_loras:
                return
            if not self.in_use.get(name):
                del self.loaded[name]


class LoRASlots:
    """The device-side stacks of the adapters a step may use (`max_loras` slots)."""

    def __init__(self, config: ModelConfig, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shapes = module_shapes(config)
        self.max_loras, self.rank = max_loras, max_lora_rank
        self.a: dict[str, torch.Tensor] = {}  # group -> [layers, slots, G * rank, in]
        self.b: dict[str, torch.Tensor] = {}  # group -> [layers, slots, out, G * rank]
        L = config.num_layers
        for group, modules in GROUPS.items():
            fan_in = shapes[modules[0]][0]
            fan_out = sum(shapes[m][1] for m in modules)
            width = len(modules) * max_lora_rank
            self.a[group] = torch.zeros(L, max_loras, width, fan_in, dtype=dtype, device=device)
            self.b[group] = torch.zeros(L, max_loras, fan_out, width, dtype=dtype, device=device)
        self._offsets = {g: [0] + [sum(shapes[m][1] for m in ms[:i + 1]) for i in range(len(ms))]
                         for g, ms in GROUPS.items()}
        self.slots: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, LRU first
        self._free = list(range(max_loras))

    def activate(self, adapters: list[LoRAAdapter]) -> dict[str, int]:
        """Put `adapters` (at most max_loras) into slots; their slot numbers."""
        wanted = {a.name for a in adapters}
        for adapter in adapters:
            if adapter.name in self.slots:
                self.slots.move_to_end(adapter.name)
                continue
            if not self._free:
                victim = next(n for n in self.slots if n not in wanted)
                self._free.append(self.slots.pop(victim))
            slot = self._free.pop()
            self._write(slot, adapter)
            self.slots[adapter.name] = slot
        return {a.name: self.slots[a.name] for a in adapters}

    def forget(self, name: str) -> None:
        """`name` was unloaded (or reloaded from elsewhere): its slot is stale."""
        slot = self.slots.pop(name, None)
        if slot is not None:
            self._free.append(slot)

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        r = self.rank
        for group, modules in GROUPS.items():
            a, b = self.a[group][:, slot], self.b[group][:, slot]
            a.zero_()
            b.zero_()
            offsets = self._offsets[group]
            for j, module in enumerate(modules):
                for layer in range(a.shape[0]):
                    ab = adapter.weights.get((layer, module))
                    if ab is None:
                        continue
                    lora_a, lora_b = ab
                    rank = lora_a.shape[0]
                    a[layer, j * r: j * r + rank].copy_(lora_a)
                    b[layer, offsets[j]: offsets[j + 1], j * r: j * r + rank].copy_(lora_b)


class LoRABatch:
    """One step's adapters: which slot each token uses (-1: the base model alone).

    The torch path (CPU) runs one shrink and one expand per adapter present, on that
    adapter's rows (a slice when they are contiguous, as they are when the step holds
    one sequence per adapter run); the Triton path (CUDA) runs one kernel pair for the
    whole step, each token reading its own slot's weights."""

    def __init__(self, slots: LoRASlots, token_slots: list[int], device: torch.device,
                 use_triton: bool) -> None:
        self.stacks = slots
        self.use_triton = use_triton
        self.token_slots = torch.tensor(token_slots, dtype=torch.int32).to(device)
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        if not use_triton:
            rows: dict[int, list[int]] = {}
            for i, s in enumerate(token_slots):
                if s >= 0:
                    rows.setdefault(s, []).append(i)
            for s, idx in rows.items():
                if idx[-1] - idx[0] + 1 == len(idx):
                    self.groups.append((s, slice(idx[0], idx[-1] + 1)))
                else:
                    self.groups.append((s, torch.tensor(idx, device=device)))

    def add(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += this step's LoRA deltas of `group` in `layer` (x: the group's input)."""
        a, b = self.stacks.a[group][layer], self.stacks.b[group][layer]
        n = x.shape[0]
        if self.use_triton:
            from raysvc_kernels.ops import triton_lora_expand, triton_lora_shrink

            slots = self.token_slots[:n]
            triton_lora_expand(triton_lora_shrink(x, a, slots), b, slots, out)
            return
        for slot, rows in self.groups:
            if isinstance(rows, slice):
                out[rows] += (x[rows] @ a[slot].T) @ b[slot].T
            else:
                out.index_add_(0, rows, (x[rows] @ a[slot].T) @ b[slot].T)
