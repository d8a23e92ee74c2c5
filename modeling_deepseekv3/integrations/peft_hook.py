"""Plain PEFT on these models, with no call from the user (``modeling.py`` mixes :class:`PlainPeftSupport` in).

Two things PEFT 0.21 gets wrong for this model without help:

* **Expert targets.** PEFT rewrites LoRA targets by ``model.config.model_type``: for ``"deepseek_v3"`` (a type
  transformers registers a weight conversion for) it moves ``gate_proj``/``up_proj``/``down_proj`` into
  ``target_parameters`` of transformers' fused 3-D experts, which this model does not have -- every MLP and
  expert target silently disappears. A built model therefore reports ``RUNTIME_MODEL_TYPE`` (config.json keeps
  the official type: the config writes ``_checkpoint_model_type``). PEFT offers no per-model seam for this.
* **FP8 targets**, below.

PEFT picks a LoRA layer class for each target with a list of dispatchers (bitsandbytes, torchao, ...,
``nn.Linear``); :class:`~modeling_deepseekv3.fp8.FP8Linear` matches none of them, so a user's own
``LoraConfig(target_modules=[...])`` -- what TRL, Axolotl and LLaMA-Factory build -- raised "Target module
FP8Linear(...) is not supported". Building or loading an FP8 model calls :func:`install`, which puts one
more dispatcher in front of PEFT's (:func:`~.peft.dispatch_fp8`: FP8Linear -> ``FP8LoraLinear``, everything
else untouched). It keys on the module class, so every model and every config in the process is covered;
a mapping registered by the user on a ``LoraConfig`` still wins.

PEFT is not imported for this: if it is not imported yet, an import hook applies the patch the moment
``peft.tuners.lora.model`` is loaded. The patch is idempotent and targets ``peft>=0.21,<0.22`` (pinned in
the extras), where ``LoraModel._create_new_module`` is the dispatch entry point.
"""

from __future__ import annotations

import importlib.abc
import sys

__all__ = ["PlainPeftSupport", "install", "is_installed"]

_TARGET = "peft.tuners.lora.model"
RUNTIME_MODEL_TYPE = "deepseek_v3_latent"  # what a built model's config reports (module docstring)
_MARK = "_deepseek_v3_fp8_dispatch"


def _patch(module) -> None:
    lora_model = module.LoraModel
    original = lora_model._create_new_module
    if getattr(original, _MARK, False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from .peft import dispatch_fp8

        new_module = dispatch_fp8(target, adapter_name, lora_config, **kwargs)
        if new_module is None:
            new_module = original(lora_config, adapter_name, target, **kwargs)
        return new_module

    setattr(_create_new_module, _MARK, True)
    lora_model._create_new_module = staticmethod(_create_new_module)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _patch(module)


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Finds ``peft.tuners.lora.model`` with the other finders and patches it once executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Make PEFT's LoRA dispatch FP8Linear targets to ``FP8LoraLinear`` (now, or when PEFT is imported)."""
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "LoraModel"):
        _patch(module)
    elif not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportHook())


def is_installed() -> bool:
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "LoraModel"):
        return getattr(module.LoraModel._create_new_module, _MARK, False)
    return any(isinstance(f, _PeftImportHook) for f in sys.meta_path)


class PlainPeftSupport:
    """Mixed in before the core model: the run-time ``model_type`` and, for FP8 models, the FP8 LoRA dispatcher."""

    def __init__(self, config, *args, **kwargs):
        if "_checkpoint_model_type" not in config.__dict__:
            config._checkpoint_model_type = type(config).model_type
        config.model_type = RUNTIME_MODEL_TYPE
        if config.is_fp8:
            install()
        super().__init__(config, *args, **kwargs)
