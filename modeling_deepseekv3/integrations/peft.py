"""LoRA fine-tuning with PEFT: targets by checkpoint names, LoRA over FP8 weights, merging back into FP8.

What this module fixes or adds, on top of plain PEFT:

* **Expert targets survive.** PEFT 0.21 rewrites LoRA targets by ``model.config.model_type``: for
  ``"deepseek_v3"`` it moves ``gate_proj``/``up_proj``/``down_proj`` into ``target_parameters`` of
  transformers' fused 3-D experts, which this model does not have -- every MLP and expert target silently
  disappeared (12 of 69 modules wrapped). Our models therefore report ``config.model_type ==
  RUNTIME_MODEL_TYPE`` at run time (config.json is still written with the official value), so plain
  ``get_peft_model(model, LoraConfig(target_modules=[...]))`` and ``PeftModel.from_pretrained`` wrap and
  restore every attention, dense-MLP, shared-expert and routed-expert target.
* **LoRA on FP8 weights** (:class:`FP8LoraLinear`): the FP8 base stays frozen and FP8; adapters live in
  the compute dtype; the base output is the block-dequantized matmul, so gradients are those of the
  dequantized base. ``merge``/``merge_and_unload`` dequantize, add the delta, and requantize with fresh
  128x128 scales (power-of-two for ``ue8m0`` checkpoints) -- the merged model saves in the official FP8
  layout. ``unmerge`` restores the exact original FP8 bytes. Plain PEFT picks this layer by itself for
  every FP8 target (:func:`dispatch_fp8`, installed into PEFT's dispatch by ``peft_hook.py`` when an FP8
  model is built), so unchanged LoRA scripts work on the official checkpoints.
* **``target_modules="all-linear"``** reaches the FP8 layers (:func:`complete_all_linear`, called from PEFT's
  own resolution by ``peft_hook.py``): the same targets as on a BF16 copy, both output heads left alone.
* :func:`lora_config` builds a config for a scope: ``"attention"``, ``"experts"`` (routed experts only),
  ``"mlp"`` (dense, shared and routed), ``"all"``.

PEFT is an optional dependency (``pip install 'modeling_deepseekv3[peft]'``); this module imports it.
"""

from __future__ import annotations

import warnings

import torch

try:
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("LoRA support needs PEFT: pip install 'modeling_deepseekv3[peft]'  (peft>=0.21,<0.22)") from exc

from ..core.mtp import SharedHead
from ..fp8 import FP8Linear, block_dequantize

__all__ = [
    "LORA_SCOPES",
    "FP8LoraLinear",
    "complete_all_linear",
    "dispatch_fp8",
    "load_lora",
    "lora_config",
    "lora_target_modules",
    "register_fp8_lora",
]

LORA_SCOPES = ("attention", "experts", "mlp", "all")
_MLP = ("gate_proj", "up_proj", "down_proj")


def lora_target_modules(config, scope: str = "all") -> list[str] | str:
    """PEFT ``target_modules`` for a scope, by checkpoint module names (a regex for routed experts only)."""
    if scope not in LORA_SCOPES:
        raise ValueError(f"scope must be one of {LORA_SCOPES}, got {scope!r}.")
    attention = (["q_proj"] if config.q_lora_rank is None else ["q_a_proj", "q_b_proj"]) + [
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
    ]
    if scope == "attention":
        return attention
    if scope == "experts":
        return r".*\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)"
    if scope == "mlp":
        return list(_MLP)
    return attention + list(_MLP)


def dispatch_fp8(target, adapter_name: str, config: LoraConfig, **kwargs):
    """PEFT dispatcher: an :class:`FP8LoraLinear` for an ``FP8Linear`` target, else None (PEFT's own
    dispatchers decide). A custom mapping the user registered for FP8Linear on the config wins."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, FP8Linear) or kwargs.get("parameter_name") is not None:
        return None
    if config._custom_modules and any(isinstance(base, key) for key in config._custom_modules):
        return None
    return FP8LoraLinear(target, adapter_name, config=config, **kwargs)


def complete_all_linear(peft_config, model) -> None:
    """Finish PEFT's expansion of ``target_modules="all-linear"`` (``peft_config.target_modules`` now holds PEFT's
    set of names: every ``nn.Linear``/``Conv1D`` but the output embedding) for FP8 layers and MTP heads.

    * Every :class:`FP8Linear` is added for LoRA, the one PEFT type with an FP8 layer (:func:`dispatch_fp8`). They
      are the decoder's projections -- attention, dense MLPs, shared and routed experts -- which a BF16 model has
      as ``nn.Linear``: without them "all-linear" on an FP8 model adapted nothing the model runs. An FP8Linear
      inside an adapter layer (the ``base_layer`` of an earlier adapter) is not added, as PEFT does for its own.
      Other PEFT types cannot wrap FP8Linear: a warning says how many layers "all-linear" leaves out for them.
    * Every MTP ``shared_head.head`` is removed: an output head like ``lm_head`` (a copy of it, vocabulary-wide),
      which PEFT excludes only as ``get_output_embeddings()``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType

    names = set(peft_config.target_modules)
    adapters = [n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    fp8 = {
        n
        for n, m in model.named_modules()
        if isinstance(m, FP8Linear) and not any(n.startswith(prefix) for prefix in adapters)
    }
    if peft_config.peft_type == PeftType.LORA:
        names |= fp8
    elif fp8 - names:
        warnings.warn(
            f"target_modules='all-linear' with {peft_config.peft_type.value}: {len(fp8 - names)} FP8 linears "
            "(attention, MLPs, experts) are left out, as this PEFT method has no layer for FP8 weights; only LoRA "
            "does. Use LoraConfig, or load with dequantize_fp8=True for a dense model.",
            stacklevel=4,
        )
    heads = {f"{n}.head" if n else "head" for n, m in model.named_modules() if isinstance(m, SharedHead)}
    peft_config.target_modules = names - heads


def register_fp8_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`FP8LoraLinear` for ``FP8Linear`` targets on ``config`` (PEFT's custom-module API).
    Not needed since FP8 models install :func:`dispatch_fp8`; kept for configs built before any FP8 model."""
    config._register_custom_module({FP8Linear: FP8LoraLinear})
    return config


def lora_config(
    model_or_config, scope: str = "all", r: int = 8, lora_alpha: int | None = None, lora_dropout: float = 0.0, **kwargs
) -> LoraConfig:
    """A ``LoraConfig`` targeting ``scope``, ready for FP8 bases. Extra kwargs go to ``LoraConfig``."""
    config = getattr(model_or_config, "config", model_or_config)
    lora = LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(config, scope),
        **kwargs,
    )
    return register_fp8_lora(lora)


def load_lora(model, adapter_path, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` with the FP8 LoRA layer registered (plain ``PeftModel.from_pretrained``
    works as well on our FP8 models)."""
    config = register_fp8_lora(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(model, adapter_path, config=config, **kwargs)


class FP8LoraLinear(_PeftLoraLinear):
    """PEFT's LoRA ``Linear`` over an :class:`FP8Linear` base (see the module docstring).

    Forward is PEFT's: ``base(x) + lora_B(lora_A(x)) * scaling``, the base running its FP8 block-scaled
    matmul. Only merging needs FP8 care: the delta is added to the dequantized weight (float32) and the
    sum requantized."""

    def __init__(self, base_layer, adapter_name: str, **kwargs):
        with warnings.catch_warnings():  # PEFT warns for any base that is not nn.Linear; this one is supported
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            super().__init__(base_layer, adapter_name, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        base: FP8Linear = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                raise NotImplementedError(
                    f"merging LoRA variant {type(self.lora_variant[name]).__name__} into FP8 weights"
                )
            if self.lora_bias[name]:
                raise NotImplementedError("merging lora_bias=True into an FP8 layer without bias")
            with torch.no_grad():
                dense = block_dequantize(base.weight, base.weight_scale_inv, base.block_size, torch.float32)
                merged = dense + self.get_delta_weight(name).to(device=dense.device, dtype=torch.float32)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                originals = self.__dict__.setdefault("_fp8_before_merge", [])
                originals.append((base.weight.detach().clone(), base.weight_scale_inv.detach().clone()))
                base.set_dense_weight(merged, getattr(base, "scale_fmt", None))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base: FP8Linear = self.get_base_layer()
        originals = self.__dict__.get("_fp8_before_merge", [])
        while self.merged_adapters:
            self.merged_adapters.pop()
            weight, scale = originals.pop()
            with torch.no_grad():
                base.weight.copy_(weight)  # exact: requantization is lossy, so keep the bytes
                base.weight_scale_inv.copy_(scale)
