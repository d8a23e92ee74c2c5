"""Plain PEFT on these models, with no call from the user (``modeling.py`` mixes :class:`PlainPeftSupport` in).

Three things PEFT 0.21 gets wrong for this model without help:

* **Expert targets.** PEFT rewrites LoRA targets by ``model.config.model_type``: for ``"deepseek_v3"`` (a type
  transformers registers a weight conversion for) it moves ``gate_proj``/``up_proj``/``down_proj`` into
  ``target_parameters`` of transformers' fused 3-D experts, which this model does not have -- every MLP and
  expert target silently disappears. A built model therefore reports ``RUNTIME_MODEL_TYPE`` (config.json keeps
  the official type: the config writes ``_checkpoint_model_type``). PEFT offers no per-model seam for this.
* **FP8 targets** and **``target_modules="all-linear"``**, below.

PEFT picks a LoRA layer class for each target with a list of dispatchers (bitsandbytes, torchao, ...,
``nn.Linear``); :class:`~modeling_deepseekv3.fp8.FP8Linear` matches none of them, so a user's own
``LoraConfig(target_modules=[...])`` -- what TRL, Axolotl and LLaMA-Factory build -- raised "Target module
FP8Linear(...) is not supported". Building or loading a model calls :func:`install`, which puts one
more dispatcher in front of PEFT's (:func:`~.peft.dispatch_fp8`: FP8Linear -> ``FP8LoraLinear``, everything
else untouched). It keys on the module class, so every model and every config in the process is covered;
a mapping registered by the user on a ``LoraConfig`` still wins.

``target_modules="all-linear"`` (the TRL idiom) is resolved by PEFT's private
``tuners_utils._maybe_include_all_linear_layers``: every ``nn.Linear``/``Conv1D`` except the model's output
embedding. On an FP8 model that found no FP8Linear -- no attention, no MLP, no expert -- and wrapped only the
MTP block's ``eh_proj`` and its ``shared_head.head`` (the second output head, which PEFT does not know), without
a word. The patch wraps that function where PEFT calls it: PEFT's answer, plus every FP8Linear for LoRA (which
the dispatcher above serves), minus every MTP output head (:func:`~.peft.complete_all_linear`). The result is
the set a BF16 copy of the model gets, heads excluded on both. FP8Linear is not made to pass for an
``nn.Linear``: ``isinstance`` stays truthful everywhere else. (PEFT methods whose module binds the function by
name -- VeRA, RandLoRA, ... -- keep PEFT's answer when PEFT was imported before this package; none of them can
wrap FP8Linear anyway.)

PEFT is not imported for this: if it is not imported yet, an import hook applies both patches the moment
``peft.tuners.lora.model`` is loaded (``peft.tuners.tuners_utils`` is loaded before it). Every model built with
this package installs them (BF16 ones for the head exclusion). The patches are idempotent and target
``peft>=0.21,<0.22`` (pinned in the extras), where ``LoraModel._create_new_module`` is the dispatch entry point and
``BaseTuner.inject_adapter`` calls ``_maybe_include_all_linear_layers(peft_config, model)``;
``tests/integration/test_peft_all_linear.py`` fails, naming the PEFT version, if either moves.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
import warnings

__all__ = ["PlainPeftSupport", "install", "is_installed"]

_TARGET = "peft.tuners.lora.model"
_TUNERS_UTILS = "peft.tuners.tuners_utils"
ALL_LINEAR_RESOLVER = "_maybe_include_all_linear_layers"  # PEFT's private "all-linear" expansion (docstring)
RUNTIME_MODEL_TYPE = "deepseek_v3_latent"  # what a built model's config reports (module docstring)
_MARK = "_deepseek_v3_fp8_dispatch"


def _patch(module) -> None:
    """Both patches, once ``peft.tuners.lora.model`` (``module``) is loaded."""
    _patch_dispatch(module)
    _patch_all_linear(sys.modules.get(_TUNERS_UTILS) or importlib.import_module(_TUNERS_UTILS))


def _patch_all_linear(tuners_utils) -> None:
    """Wrap PEFT's ``"all-linear"`` resolver (module docstring). Without it (another PEFT than the pinned one) a
    warning says that ``"all-linear"`` will not reach the FP8 layers, rather than letting it skip them unseen."""
    original = getattr(tuners_utils, ALL_LINEAR_RESOLVER, None)
    if original is None:
        version = getattr(sys.modules.get("peft"), "__version__", "?")  # peft may still be importing
        warnings.warn(
            f"PEFT {version} has no {_TUNERS_UTILS}.{ALL_LINEAR_RESOLVER} (modeling_deepseekv3 supports "
            "peft>=0.21,<0.22): LoraConfig(target_modules='all-linear') will skip every FP8 linear of an FP8 "
            "model. Name the targets instead: modeling_deepseekv3.integrations.peft.lora_target_modules(config).",
            stacklevel=2,
        )
        return
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _maybe_include_all_linear_layers(peft_config, model):
        from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

        targets = getattr(peft_config, "target_modules", None)
        asked = isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
        peft_config = original(peft_config, model)
        if asked:
            from .peft import complete_all_linear

            complete_all_linear(peft_config, model)
        return peft_config

    setattr(_maybe_include_all_linear_layers, _MARK, True)
    setattr(tuners_utils, ALL_LINEAR_RESOLVER, _maybe_include_all_linear_layers)


def _patch_dispatch(module) -> None:
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
    """Make PEFT's LoRA dispatch FP8Linear targets to ``FP8LoraLinear`` and its ``"all-linear"`` include them and
    leave the MTP heads alone (now, or when PEFT is imported)."""
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "LoraModel"):
        _patch(module)
    elif not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportHook())


def is_installed() -> bool:
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "LoraModel"):
        resolver = getattr(sys.modules.get(_TUNERS_UTILS), ALL_LINEAR_RESOLVER, None)
        return getattr(module.LoraModel._create_new_module, _MARK, False) and getattr(resolver, _MARK, False)
    return any(isinstance(f, _PeftImportHook) for f in sys.meta_path)


class PlainPeftSupport:
    """Mixed in before the core model: the run-time ``model_type`` and PEFT's FP8 LoRA dispatch and ``"all-linear"``
    resolution (installed for BF16 models too: their MTP head must not be targeted either)."""

    def __init__(self, config, *args, **kwargs):
        if "_checkpoint_model_type" not in config.__dict__:
            config._checkpoint_model_type = type(config).model_type
        config.model_type = RUNTIME_MODEL_TYPE
        install()
        super().__init__(config, *args, **kwargs)
