"""Multi-LoRA: many PEFT adapters on one base model, mixed in one step.

A LoRA adapter adds `scaling * B @ A @ x` to a linear layer's output (A: [r, in],
B: [out, r]). Serving many adapters means one batch whose rows each name their own
adapter (or none), so the base matmul runs once for everyone and only the small rank-r
products differ per row — never one engine per adapter (S-LoRA, Punica, vLLM).

Layout. The model fuses q|k|v and gate|up, so an adapter's modules are grouped the same
way: per group and layer, each slot's A matrices are stacked into G * max_lora_rank rows
(G = 3 for qkv, 2 for gate_up, 1 for o and down) and its B matrices into the matching
block-diagonal columns, so a group costs one shrink (x @ A^T) and one expand (@ B^T)
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
- `LoRABatch`: one step's per-token slot (-1 = the base model); the model calls its
  `linear` in place of each fused linear.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


# the model's fused weights each group extends: (weight, bias) attribute names of a layer
LAYER_WEIGHTS = {"qkv": ("qkv_w", "qkv_b"), "o": ("o_w", "o_b"),
                 "gate_up": ("gate_up_w", "gate_up_b"), "down": ("down_w", "down_b")}


class LoRASlots:
    """The device-side stacks of the adapters a step may use (`max_loras` slots).

    Per group and layer, A is [slots * W, in] (W = G * rank; slot s owns rows s*W ..
    s*W + W - 1) and B is stored transposed, [slots * W, out], so one slot's A and B, or a
    range of slots', are plain views. A lives right under the base weight in one tensor,
    `ext` = [W_base; A]: a decode step multiplies x by `ext` once and gets the base output
    and every slot's shrink together (the shrink rides on the base matmul instead of
    costing a call of its own); the layer's weight becomes a view of `ext`'s top rows,
    so steps without adapters run exactly as before."""

    def __init__(self, config: ModelConfig, layers: list, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shapes = module_shapes(config)
        self.max_loras, self.rank = max_loras, max_lora_rank
        self.ext: dict[str, list[torch.Tensor]] = {}  # group -> per layer [out + S*W, in]
        self.ext_bias: dict[str, list[torch.Tensor | None]] = {}  # [out + S*W] or None
        self.a: dict[str, list[torch.Tensor]] = {}  # group -> per layer [S*W, in] (in ext)
        self.bt: dict[str, torch.Tensor] = {}  # group -> [layers, S*W, out]
        self.width: dict[str, int] = {}  # group -> W
        for group, modules in GROUPS.items():
            fan_in = shapes[modules[0]][0]
            fan_out = sum(shapes[m][1] for m in modules)
            width = self.width[group] = len(modules) * max_lora_rank
            w_name, b_name = LAYER_WEIGHTS[group]
            self.ext[group], self.ext_bias[group], self.a[group] = [], [], []
            for layer in layers:
                ext = torch.zeros(fan_out + max_loras * width, fan_in, dtype=dtype,
                                  device=device)
                ext[:fan_out].copy_(getattr(layer, w_name))
                setattr(layer, w_name, ext[:fan_out])  # re-homed: same values, same shape
                bias = getattr(layer, b_name)
                self.ext[group].append(ext)
                self.a[group].append(ext[fan_out:])
                self.ext_bias[group].append(None if bias is None else torch.cat(
                    [bias, bias.new_zeros(max_loras * width)]))
            self.bt[group] = torch.zeros(len(layers), max_loras * width, fan_out, dtype=dtype,
                                         device=device)
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
            slot = min(self._free)  # low slots first: a step's slots tend to be a range
            self._free.remove(slot)
            self._write(slot, adapter)
            self.slots[key] = slot
            self._held[slot] = adapter  # (keeps it alive: its id is not reused meanwhile)
        return {id(a): self.slots[id(a)] for a in adapters}

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        r = self.rank
        self.num_writes += 1
        for group, modules in GROUPS.items():
            w = self.width[group]
            offsets = self._offsets[group]
            for layer in range(len(self.a[group])):
                a = self.a[group][layer][slot * w:(slot + 1) * w]
                bt = self.bt[group][layer, slot * w:(slot + 1) * w]
                a.zero_()
                bt.zero_()
                for j, module in enumerate(modules):
                    ab = adapter.weights.get((layer, module))
                    if ab is None:
                        continue
                    lora_a, lora_b = ab
                    rank = lora_a.shape[0]
                    a[j * r: j * r + rank].copy_(lora_a)
                    bt[j * r: j * r + rank, offsets[j]: offsets[j + 1]].copy_(lora_b.T)


# The slice form when the step's adapter runs are few and long (prefill chunks): each
# small matmul has a fixed cost (~20 us on a CPU core in bf16) that decode-sized runs of
# a few tokens do not amortize; the gathered form pays it once per linear, not per run.
SLICED_MAX_RUNS = 8
SLICED_MIN_TOKENS_PER_RUN = 32


class LoRABatch:
    """One step's adapters: which slot each token uses (-1: the base model alone).

    The torch path (CPU) has two forms, both expanding only each token's own adapter.
    When the step's adapter runs are few and long (prefill), the base linear runs as
    usual and each run is multiplied by its slot's A and B on a slice (two ops per
    adapter). Otherwise (decode: a few tokens per adapter) one matmul with the extended
    weight gives the base output and every slot's shrink; each adapter's tokens' own
    shrinks are gathered into one padded [adapters, longest, W] batch, expanded with one
    batched matmul and added back in place (three ops beside the base matmul, whatever
    the number of adapters). The engine orders a step's rows by slot, so a run is
    contiguous and the slots a range (their B stack then a view). The Triton path (CUDA)
    runs one kernel pair for the step, each token reading its own slot's weights."""

    def __init__(self, slots: LoRASlots, token_slots: list[int], device: torch.device,
                 use_triton: bool) -> None:
        self.stacks = slots
        self.use_triton = use_triton
        self.token_slots = torch.tensor(token_slots, dtype=torch.int32).to(device)
        self.runs: list[tuple[int, slice]] = []  # (slot, its tokens): the sliced form
        if use_triton:
            return
        rows: dict[int, list[int]] = {}
        for i, s in enumerate(token_slots):
            if s >= 0:
                rows.setdefault(s, []).append(i)
        contiguous = all(r[-1] - r[0] + 1 == len(r) for r in rows.values())
        if (contiguous and len(rows) <= SLICED_MAX_RUNS
                and all(len(r) >= SLICED_MIN_TOKENS_PER_RUN for r in rows.values())):
            self.runs = [(s, slice(r[0], r[-1] + 1)) for s, r in sorted(rows.items())]
            return
        # the gathered form: adapter k's tokens at rows k*longest .. of the padded batch
        order = sorted(rows)
        longest = max(len(r) for r in rows.values())
        tokens, slot_of_row, valid, targets = [], [], [], []
        for k, s in enumerate(order):
            r = rows[s]
            tokens += r + [r[0]] * (longest - len(r))
            slot_of_row += [s] * longest
            valid += range(k * longest, k * longest + len(r))
            targets += r
        self.num, self.longest = len(order), longest
        self.gather_tokens = torch.tensor(tokens, device=device)
        self.gather_slots = torch.tensor(slot_of_row, device=device)
        self.valid = None if len(valid) == len(tokens) else torch.tensor(valid, device=device)
        self.targets = torch.tensor(targets, device=device)
        # the engine puts base rows first, then each slot's: the adapters' rows are one
        # range, added to as a slice (index_add_ into the strided output is far slower)
        first = targets[0]
        self.target_range = slice(first, first + len(targets)) if targets == list(
            range(first, first + len(targets))) else None
        lo = order[0]
        contiguous_slots = order == list(range(lo, lo + len(order)))
        self.slot_range = slice(lo, lo + len(order)) if contiguous_slots else None
        self.slot_index = torch.tensor(order, device=device)

    def linear(self, group: str, layer: int, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear(x, weight, bias)` plus this step's LoRA deltas of `group` in `layer`."""
        if self.use_triton or self.runs:
            out = F.linear(x, weight, bias)
            self.add(group, layer, x, out)
            return out
        stacks = self.stacks
        w, n = stacks.width[group], weight.shape[0]
        bias = stacks.ext_bias[group][layer] if bias is not None else None
        full = F.linear(x, stacks.ext[group][layer], bias)  # [tokens, out + S*W]
        out, shrunk = full[:, :n], full[:, n:].unflatten(1, (-1, w))  # [tokens, S, W]
        y = shrunk[self.gather_tokens, self.gather_slots].view(self.num, self.longest, w)
        bt = stacks.bt[group][layer].view(-1, w, n)
        bt = bt[self.slot_range] if self.slot_range is not None else bt[self.slot_index]
        d = torch.bmm(y, bt).view(-1, n)
        if self.valid is not None:
            d = d.index_select(0, self.valid)
        if self.target_range is not None:
            out[self.target_range] += d
        else:
            out.index_add_(0, self.targets, d)
        return out

    def add(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += this step's LoRA deltas of `group` in `layer` (the sliced form, or
        Triton's kernels; x: the group's input)."""
        w = self.stacks.width[group]
        a, bt = self.stacks.a[group][layer], self.stacks.bt[group][layer]
        if self.use_triton:
            from raysvc_kernels.ops import triton_lora_expand, triton_lora_shrink

            slots = self.token_slots[:x.shape[0]]
            y = triton_lora_shrink(x, a.view(-1, w, a.shape[-1]), slots)
            triton_lora_expand(y, bt.view(-1, w, bt.shape[-1]).transpose(1, 2), slots, out)
            return
        for slot, rows in self.runs:
            cols = slice(slot * w, (slot + 1) * w)
            out[rows].addmm_(x[rows] @ a[cols].T, bt[cols])
