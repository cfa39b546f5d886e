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
  its adapter was evicted mid-flight; each request holds its adapter object, so unloading
  or reloading a name never changes a running request's weights);
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
        self.names: tuple[str, ...] = ()  # `loaded`'s keys, for readers on other threads
        self.known: dict[str, str] = {}  # a copy of `paths`, replaced (never mutated) on change
        for name, path in (modules or {}).items():
            self.add(name, path)

    def add(self, name: str, path: str, replace: bool = False) -> LoRAAdapter:
        """Register and load `name` (a bad directory fails here, changing nothing). With
        `replace`, a name known from another directory now means this one (its running
        requests keep the adapter they started with)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"lora_name: expected a non-empty string, got {name!r}")
        known = self.paths.get(name)
        if known is not None and known != str(path) and not replace:
            raise ValueError(f"lora_name: {name!r} is already loaded from {known!r}")
        adapter = self._load(name, str(path))
        self.paths[name] = str(path)
        self.known = dict(self.paths)
        return adapter

    def remove(self, name: str) -> None:
        """New requests may no longer name it; live ones keep it loaded until they end."""
        if name not in self.paths:
            raise KeyError(name)
        del self.paths[name]
        self.known = dict(self.paths)
        self._evict()

    def acquire(self, name: str) -> LoRAAdapter:
        """The adapter for a new request (loaded now if it is not); pinned until release."""
        path = self.paths.get(name)
        if path is None:
            raise ValueError(f"lora_name: unknown adapter {name!r}; loaded: "
                             f"{', '.join(sorted(self.paths)) or 'none'}")
        adapter = self.loaded.get(name)
        if adapter is None:
            adapter = self._load(name, path)
        else:
            self.loaded.move_to_end(name)
        self.in_use[name] = self.in_use.get(name, 0) + 1
        return adapter

    def release(self, name: str) -> None:
        left = self.in_use.get(name, 0) - 1
        if left > 0:
            self.in_use[name] = left
        else:
            self.in_use.pop(name, None)
            self._evict()

    def _load(self, name: str, path: str) -> LoRAAdapter:
        adapter = load_adapter(name, path, self.config, self.max_lora_rank, self.dtype)
        self.loaded[name] = adapter
        self.num_loads += 1
        self._evict()
        return adapter

    def _evict(self) -> None:
        for name in list(self.loaded):  # removed adapters first, then LRU order
            if name not in self.paths and not self.in_use.get(name):
                del self.loaded[name]
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_cpu_loras:
                break
            if not self.in_use.get(name):
                del self.loaded[name]
        self.names = tuple(self.loaded)


class LoRASlots:
    """The device-side stacks of the adapters a step may use (`max_loras` slots).

    Per group and layer, A is [slots * W, in] and B is [out, slots * W] (W = G * rank,
    slot s owning columns s*W .. s*W + W - 1), so a step's shrink for every adapter at once
    is one matmul, and the expand one more."""

    def __init__(self, config: ModelConfig, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shapes = module_shapes(config)
        self.max_loras, self.rank = max_loras, max_lora_rank
        self.a: dict[str, torch.Tensor] = {}  # group -> [layers, slots * W, in]
        self.b: dict[str, torch.Tensor] = {}  # group -> [layers, out, slots * W]
        self.width: dict[str, int] = {}  # group -> W
        L = config.num_layers
        for group, modules in GROUPS.items():
            fan_in = shapes[modules[0]][0]
            fan_out = sum(shapes[m][1] for m in modules)
            width = self.width[group] = len(modules) * max_lora_rank
            self.a[group] = torch.zeros(L, max_loras * width, fan_in, dtype=dtype, device=device)
            self.b[group] = torch.zeros(L, fan_out, max_loras * width, dtype=dtype, device=device)
        self._offsets = {g: [0] + [sum(shapes[m][1] for m in ms[:i + 1]) for i in range(len(ms))]
                         for g, ms in GROUPS.items()}
        self.slots: OrderedDict[int, int] = OrderedDict()  # id(adapter) -> slot, LRU first
        self._held: dict[int, LoRAAdapter] = {}  # slot -> the adapter written there
        self._free = list(range(max_loras))
        self.num_writes = 0

    def activate(self, adapters: list[LoRAAdapter]) -> dict[int, int]:
        """Put `adapters` (at most max_loras) into slots; id(adapter) -> its slot. Adapters
        are told apart by identity: a name loaded again from elsewhere is another one."""
        wanted = {id(a) for a in adapters}
        for adapter in adapters:
            key = id(adapter)
            if key in self.slots:
                self.slots.move_to_end(key)
                continue
            if not self._free:
                victim = next(k for k in self.slots if k not in wanted)
                self._free.append(self.slots.pop(victim))
            slot = self._free.pop()
            self._write(slot, adapter)
            self.slots[key] = slot
            self._held[slot] = adapter  # (keeps it alive: its id is not reused meanwhile)
        return {id(a): self.slots[id(a)] for a in adapters}

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        r = self.rank
        self.num_writes += 1
        for group, modules in GROUPS.items():
            w = self.width[group]
            a = self.a[group][:, slot * w:(slot + 1) * w]
            b = self.b[group][:, :, slot * w:(slot + 1) * w]
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


# The slice form when the step's adapter runs are few and long (prefill chunks): each
# small matmul has a fixed cost (~20 us on a CPU core in bf16) that decode-sized runs
# of a few tokens do not amortize; the masked form pays it 3 times per linear, not 2 per run.
GROUPED_MAX_RUNS = 8
GROUPED_MIN_TOKENS_PER_RUN = 32


class LoRABatch:
    """One step's adapters: which slot each token uses (-1: the base model alone).

    The torch path (CPU) has two forms. The engine orders a step's rows by adapter, so
    each adapter's tokens are one contiguous run: when the runs are long (prefill), each
    is multiplied by its own slot's A and B on a slice (two ops per adapter, no wasted
    FLOPs). Otherwise (decode: a few tokens per adapter) every token is multiplied by
    every slot's A at once, the columns of the slots it does not use zeroed, and expanded
    with every slot's B: three ops per fused linear whatever the number of adapters, at
    max_loras times the rank FLOPs.
    The Triton path (CUDA) runs one kernel pair for the step, each token reading only its
    own slot's weights."""

    def __init__(self, slots: LoRASlots, token_slots: list[int], device: torch.device,
                 use_triton: bool) -> None:
        self.stacks = slots
        self.use_triton = use_triton
        self.token_slots = torch.tensor(token_slots, dtype=torch.int32).to(device)
        self.runs: list[tuple[int, slice]] = []  # (slot, its tokens), when contiguous
        self.masks: dict[int, torch.Tensor] = {}  # W -> [tokens, slots * W] 0/1 otherwise
        if use_triton:
            return
        start = 0
        for i in range(1, len(token_slots) + 1):
            if i == len(token_slots) or token_slots[i] != token_slots[start]:
                if token_slots[start] >= 0:
                    self.runs.append((token_slots[start], slice(start, i)))
                start = i
        adapted = sum(r.stop - r.start for _, r in self.runs)
        if (len(self.runs) <= GROUPED_MAX_RUNS
                and adapted >= GROUPED_MIN_TOKENS_PER_RUN * len(self.runs)):
            return
        self.runs = []
        idx = torch.tensor(token_slots)
        one_hot = torch.zeros(len(token_slots), slots.max_loras + 1)
        one_hot[torch.arange(len(token_slots)), idx] = 1.0  # -1: the spare last column
        one_hot = one_hot[:, :slots.max_loras]
        for w in set(slots.width.values()):
            self.masks[w] = one_hot.repeat_interleave(w, dim=1).to(
                device=device, dtype=slots.a["o"].dtype)

    def add(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += this step's LoRA deltas of `group` in `layer` (x: the group's input)."""
        a, b = self.stacks.a[group][layer], self.stacks.b[group][layer]
        if self.use_triton:
            from raysvc_kernels.ops import triton_lora_expand, triton_lora_shrink

            w, n = self.stacks.width[group], x.shape[0]
            slots = self.token_slots[:n]
            y = triton_lora_shrink(x, a.view(-1, w, a.shape[-1]), slots)
            triton_lora_expand(y, b.view(b.shape[0], -1, w).transpose(0, 1), slots, out)
            return
        w = self.stacks.width[group]
        if self.runs:
            for slot, rows in self.runs:
                cols = slice(slot * w, (slot + 1) * w)
                out[rows].addmm_(x[rows] @ a[cols].T, b[:, cols].T)
            return
        xa = x @ a.T
        xa *= self.masks[w]
        out.addmm_(xa, b.T)
