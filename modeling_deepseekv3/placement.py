"""Device maps for DeepSeek-V3-family models: where every expert, attention block and embedding goes.

654B of V3's 671B parameters are routed experts, each one module here (``model.layers.L.mlp.experts.E``),
so they can be spread over GPUs, CPU RAM and disk one by one. :func:`plan_device_map` computes a **flat,
fully enumerated** map (one entry per placement unit, no entry nested in another, every expert named --
Accelerate and transformers mis-handle nested maps and prefix-ambiguous keys such as ``experts.1`` vs
``experts.17``) that ``from_pretrained(device_map=...)`` accepts as is.

Sizes come from the official key table (``checkpoint_layout``): FP8 weights count 1 byte per parameter
plus their FP32 block scales, dense tensors the load dtype's size, the router weight and bias FP32. A
latent-cache budget (``context_tokens`` x ``batch_size`` x bytes per token per layer) is charged to the
device that holds each layer's attention.

Strategies:

``"layers"``       whole decoder layers, contiguously over the GPUs, then CPU, then disk.
``"experts"``      everything but the routed experts first (contiguously, balanced over the GPUs), then each
                   MoE layer's experts in equal contiguous groups over all GPUs; overflow to CPU, then disk.
``"cpu-experts"``  everything but the routed experts on the GPUs, the routed experts in CPU RAM (where, in a
                   GPU+CPU layout, they also compute), overflow to disk.

Without GPUs in ``max_memory`` every strategy fills CPU RAM, then disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.layout import checkpoint_layout
from .core.cache import latent_bytes_per_token
from .core.configuration import DeepseekV3PluginConfig

__all__ = [
    "STRATEGIES",
    "Placement",
    "compute_cpu_experts_on_cpu",
    "placement_units",
    "plan_device_map",
    "plan_placement",
]

STRATEGIES = ("layers", "experts", "cpu-experts")
GiB = 1024**3
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)$")


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size) -> int:
    """Bytes from an int or a string such as ``"80GB"``, ``"1.5TB"``, ``"141GiB"``, ``"2TiB"``."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot read the memory size {size!r}; write e.g. '80GB', '141GiB', '1.5TB' or bytes.")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _device_key(device) -> str | int:
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return int(device)
    device = str(device)
    if device.startswith("cuda:"):
        return int(device.split(":")[1])
    if device in ("cpu", "disk"):
        return device
    raise ValueError(f"max_memory key {device!r}: use GPU indices (0, 1, ...), 'cpu' or 'disk'.")


def _unit_of(key: str) -> str:
    """The placement unit (module path) a checkpoint key belongs to."""
    parts = key.split(".")
    if parts[0] != "model" or parts[1] != "layers":
        return ".".join(parts[:-1])  # model.embed_tokens, model.norm, lm_head
    layer = ".".join(parts[:3])  # model.layers.L
    rest = parts[3:]
    if rest[0] == "mlp":
        if len(rest) > 2 and rest[1] == "experts":
            return f"{layer}.mlp.experts.{rest[2]}"
        if rest[1] in ("gate", "shared_experts"):
            return f"{layer}.mlp.{rest[1]}"
        return f"{layer}.mlp"  # dense MLP
    if rest[0] == "shared_head":
        return f"{layer}.shared_head"
    return f"{layer}.{rest[0]}"  # self_attn, norms, MTP's embed_tokens / enorm / hnorm / eh_proj


def placement_units(config: DeepseekV3PluginConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """``{module path: bytes}`` for every placement unit, in model order (what the map will enumerate)."""
    n_layers = config.num_hidden_layers + config.num_mtp_modules
    units: dict[str, int] = {}
    for key, spec in checkpoint_layout(config, dense_dtype=dtype).items():
        if key.startswith("model.layers."):
            if int(key.split(".")[2]) >= n_layers:
                continue  # an MTP layer that is not built
        itemsize = spec.dtype.itemsize
        if key.endswith("mlp.gate.weight"):
            itemsize = 4  # router kept in FP32
        numel = 1
        for d in spec.shape:
            numel *= d
        unit = _unit_of(key)
        units[unit] = units.get(unit, 0) + numel * itemsize
    return units


def _size(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB (a small model's plan would read 0.01)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def _layer_of(unit: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)(\.|$)", unit)
    return int(m.group(1)) if m else None


@dataclass
class Placement:
    """A planned placement: ``device_map`` (flat), bytes per device, and what did not fit."""

    device_map: dict[str, str | int]
    weights: dict[str | int, int]
    cache: dict[str | int, int]
    budget: dict[str | int, int]
    unplaced: dict[str, int] = field(default_factory=dict)
    strategy: str = "experts"
    notes: list[str] = field(default_factory=list)
    gpu_headroom: float = 0.0  # the share of each GPU's max_memory kept free (not in ``budget``)
    fp8: bool = False  # the checkpoint's weights are FP8 (1 byte/param) already

    @property
    def fits(self) -> bool:
        return not self.unplaced

    def report(self) -> str:
        lines = [f"strategy {self.strategy!r}: {len(self.device_map)} placement units"]
        header = f"  {'device':8s} {'weights':>11s} {'latent cache':>13s} {'budget':>11s} {'free':>11s}"
        lines.append(header)
        for dev in self.budget:
            used = self.weights.get(dev, 0) + self.cache.get(dev, 0)
            budget = self.budget[dev]
            cells = (self.weights.get(dev, 0), self.cache.get(dev, 0), budget, budget - used)
            lines.append(f"  {dev!s:8s} " + " ".join(f"{_size(b):>{w}s}" for b, w in zip(cells, (11, 13, 11, 11))))
        if self.gpu_headroom and any(isinstance(d, int) for d in self.budget):
            lines.append(
                f"  (GPU budgets are max_memory less {self.gpu_headroom:.0%} kept free for activations: gpu_headroom)"
            )
        experts = [u for u, d in self.device_map.items() if _EXPERT.match(u)]
        if experts:
            by_dev: dict = {}
            for u in experts:
                by_dev[self.device_map[u]] = by_dev.get(self.device_map[u], 0) + 1
            lines.append("  routed experts per device: " + ", ".join(f"{d}: {n}" for d, n in by_dev.items()))
        if self.fits:
            lines.append("FITS.")
        else:
            missing = sum(self.unplaced.values())
            lines.append(
                f"DOES NOT FIT: {len(self.unplaced)} units ({missing / GiB:.2f} GiB) have no room "
                f"(first: {next(iter(self.unplaced))})."
            )
            lines.append("  what to change: add 'disk' to max_memory (experts can be read from the shards), raise")
            lines.append(
                "  the cpu budget, add GPUs, lower context_tokens or use latent_cache_format='fp8' (-43% cache),"
            )
            lines.append(
                "  or load_mtp=False (drops the MTP layer)."
                if self.fp8
                else "  load_mtp=False (drops the MTP layer), or keep the checkpoint in FP8 (1 byte/param)."
            )
        lines.extend(self.notes)
        return "\n".join(lines)


def plan_placement(
    config_or_path,
    max_memory: dict,
    strategy: str = "experts",
    dtype: torch.dtype = torch.bfloat16,
    context_tokens: int = 0,
    batch_size: int = 1,
    gpu_headroom: float = 0.05,
) -> Placement:
    """Plan a placement; never raises for lack of room (see :attr:`Placement.fits`). Arguments as in
    :func:`plan_device_map`."""
    config = as_config(config_or_path)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if not max_memory:
        raise ValueError("max_memory is empty: give budgets such as {0: '80GiB', 'cpu': '500GiB', 'disk': '2TiB'}.")
    budget: dict[str | int, int] = {}
    for key, size in max_memory.items():
        dev = _device_key(key)
        budget[dev] = parse_size(size)
    gpus = sorted(d for d in budget if isinstance(d, int))
    for g in gpus:
        budget[g] = int(budget[g] * (1 - gpu_headroom))
    order = gpus + [d for d in ("cpu", "disk") if d in budget]
    budget = {d: budget[d] for d in order}

    units = placement_units(config, dtype)
    fmt = config.latent_cache_format
    cache_per_layer = (
        context_tokens * batch_size * latent_bytes_per_token(config.kv_lora_rank, config.qk_rope_head_dim, fmt, dtype)
    )
    used = {d: 0 for d in order}
    cache = {d: 0 for d in order}
    device_map: dict[str, str | int] = {}
    unplaced: dict[str, int] = {}

    # a disk-offloaded layer computes on the main memory device, which then holds its latent cache; so
    # weights put there leave room for the caches of the layers still to be placed (they may go to disk)
    compute_home = "cpu" if "cpu" in budget else (gpus[0] if gpus else None)
    pending = {"attention": sum(1 for u in units if u.endswith(".self_attn"))}

    def put(unit: str, size: int, candidates) -> bool:
        is_attention = unit.endswith(".self_attn")
        extra = cache_per_layer if is_attention else 0
        for dev in candidates:
            cache_dev = compute_home if dev == "disk" else dev
            if cache_dev is None and extra:
                continue
            reserve = 0
            if "disk" in budget and dev == compute_home:
                reserve = cache_per_layer * (pending["attention"] - (1 if is_attention else 0))
            fits_weights = used[dev] + cache[dev] + size + reserve + (extra if cache_dev == dev else 0) <= budget[dev]
            fits_cache = (
                extra == 0 or cache_dev == dev or used[cache_dev] + cache[cache_dev] + extra <= budget[cache_dev]
            )
            if fits_weights and fits_cache:
                device_map[unit] = dev
                used[dev] += size
                cache[cache_dev] += extra
                pending["attention"] -= 1 if is_attention else 0
                return True
        unplaced[unit] = size + extra
        pending["attention"] -= 1 if is_attention else 0
        return False

    expert_units = [u for u in units if _EXPERT.match(u)]
    other_units = [u for u in units if not _EXPERT.match(u)]
    if strategy == "layers":
        _place_contiguous(list(units), units, gpus, order, put, cache_per_layer)
    else:
        # the always-active parts first (contiguously; balanced over the GPUs by their share)
        _place_contiguous(other_units, units, gpus, order, put, cache_per_layer)
        if strategy == "experts" and gpus:
            by_layer: dict[int, list[str]] = {}
            for u in expert_units:
                by_layer.setdefault(_layer_of(u), []).append(u)
            for layer_units in by_layer.values():
                n = len(layer_units)
                for i, u in enumerate(layer_units):
                    home = gpus[(i * len(gpus)) // n]
                    rest = sorted((g for g in gpus if g != home), key=lambda g: used[g] - budget[g])
                    put(u, units[u], [home, *rest, *(d for d in order if not isinstance(d, int))])
        else:  # cpu-experts, or no GPUs: CPU RAM, then disk
            for u in expert_units:
                put(u, units[u], [d for d in order if not isinstance(d, int)])
    notes = []
    if strategy == "cpu-experts" and gpus and "cpu" not in budget:
        notes.append("note: 'cpu-experts' without a 'cpu' budget sends the experts to disk.")
    return Placement(
        device_map, {d: used[d] for d in order}, cache, budget, unplaced, strategy, notes, gpu_headroom, config.is_fp8
    )


def _place_contiguous(unit_names, sizes, gpus, order, put, cache_per_layer) -> None:
    """Fill devices in order, keeping model order; with GPUs, spread over them by bytes so each GPU gets a
    contiguous, roughly equal share (the remainder goes on with CPU, then disk)."""
    if not gpus:
        for u in unit_names:
            put(u, sizes[u], order)
        return
    total = sum(sizes[u] + (cache_per_layer if u.endswith(".self_attn") else 0) for u in unit_names)
    share = total / len(gpus)
    acc, gi = 0, 0
    for u in unit_names:
        size = sizes[u] + (cache_per_layer if u.endswith(".self_attn") else 0)
        if acc + size > share * (gi + 1) and gi < len(gpus) - 1 and acc > 0:
            gi += 1
        candidates = gpus[gi:] + [d for d in order if not isinstance(d, int)]
        put(u, sizes[u], candidates)
        acc += size


def as_config(config_or_path) -> DeepseekV3PluginConfig:
    if isinstance(config_or_path, DeepseekV3PluginConfig) or hasattr(config_or_path, "kv_lora_rank"):
        return config_or_path
    path = Path(os.fspath(config_or_path))
    if path.is_file():
        import json

        return DeepseekV3PluginConfig.from_dict(json.loads(path.read_text()))
    return DeepseekV3PluginConfig.from_pretrained(path)


def plan_device_map(
    config_or_path,
    max_memory: dict,
    strategy: str = "experts",
    dtype: torch.dtype = torch.bfloat16,
    context_tokens: int = 0,
    batch_size: int = 1,
    gpu_headroom: float = 0.05,
) -> dict[str, str | int]:
    """A flat, fully enumerated ``device_map`` for ``from_pretrained``.

    ``config_or_path``: a config, a checkpoint directory or a config.json path. ``max_memory``: budgets per
    device, e.g. ``{0: "80GiB", 1: "80GiB", "cpu": "1500GiB", "disk": "4TiB"}`` (GPU indices, ``"cpu"``,
    ``"disk"``; ints are bytes). ``strategy``: ``"layers"``, ``"experts"`` or ``"cpu-experts"`` (module
    docstring). ``dtype``: the load dtype of the non-FP8 tensors. ``context_tokens`` x ``batch_size``: the
    latent cache to reserve. ``gpu_headroom``: fraction of each GPU kept free for activations.
    Raises ``ValueError`` with the fit report when the model does not fit; :func:`plan_placement` returns
    the plan either way."""
    plan = plan_placement(config_or_path, max_memory, strategy, dtype, context_tokens, batch_size, gpu_headroom)
    if not plan.fits:
        raise ValueError("the model does not fit in max_memory:\n" + plan.report())
    return plan.device_map


_EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+$")


def compute_cpu_experts_on_cpu(model) -> int:
    """In a device map that mixes GPUs and ``"cpu"``, Accelerate treats CPU entries as offloaded: their
    weights are copied to the GPU for every forward. For routed experts that is the wrong trade (V3: 8
    experts x 44 MB per token per layer over PCIe); instead each CPU-mapped expert gets its weights back
    in CPU RAM and a hook that runs it on the CPU (the activations move: 2 x 7168 values per token).
    Returns the number of experts changed."""
    device_map = getattr(model, "hf_device_map", None) or {}
    has_gpu = any(
        isinstance(d, int) or (isinstance(d, str) and d.startswith(("cuda", "xpu"))) for d in device_map.values()
    )
    targets = [name for name, dev in device_map.items() if dev == "cpu" and _EXPERT_KEY.search(name)]
    if not has_gpu or not targets:
        return 0
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for name in targets:
        module = model.get_submodule(name)
        values = {}
        for sub_name, sub in module.named_modules():
            hook = getattr(sub, "_hf_hook", None)
            weights_map = getattr(hook, "weights_map", None)
            for pname, param in sub.named_parameters(recurse=False):
                full = f"{sub_name}.{pname}" if sub_name else pname
                if param.device.type == "meta":
                    if weights_map is None:
                        raise RuntimeError(f"{name}.{full} is on the meta device and its offload hook has no weights.")
                    values[full] = weights_map[pname]
                else:
                    values[full] = param.data
        remove_hook_from_module(module, recurse=True)
        for full, value in values.items():
            set_module_tensor_to_device(module, full, "cpu", value=value.to("cpu"))
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    model.freeze_fp8_storage()
    return len(targets)
