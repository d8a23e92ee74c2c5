"""The ``trust_remote_code`` route: the two shim files copied into every checkpoint, and what they call here.

``configuration_deepseek.py`` and ``modeling_deepseek.py`` are copied into checkpoints
(:func:`modeling_deepseekv3.checkpoint.remote_code.stamp_remote_code`) and stay there across upgrades of this
package, so they hold no logic: they subclass the public classes and call :func:`route_trusted_native_loads`.
Names they import from this package are a contract: keep them.

Importing this package does nothing (the checkpoint writers read the shim files through it).
"""

from __future__ import annotations

__all__ = ["route_trusted_native_loads"]

_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "local_files_only",
    "subfolder",
    "code_revision",
)


def route_trusted_native_loads() -> None:
    """Make ``transformers.DeepseekV3ForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (and
    ``DeepseekV3Model``) load DIR's remote code when that code is ours; idempotent.

    Why: TRL (``SFTTrainer(model="DIR")``) and ``transformers serve`` load ``AutoConfig(DIR,
    trust_remote_code=True)`` and then call ``getattr(transformers, config.architectures[0]).from_pretrained(DIR,
    trust_remote_code=True)``. Our checkpoints keep DeepSeek's architecture name (vLLM, SGLang and transformers
    pick their implementation by it), so that is transformers' built-in class, which ignores
    ``trust_remote_code`` and cannot load partial FP8 blocks on CPU. The shim calls this when transformers
    imports it -- that is, only in a process that already trusted a checkpoint with our ``auto_map`` -- and from
    then on such a call goes through ``AutoModelForCausalLM`` / ``AutoModel``, which follow the ``auto_map``.
    Everything else is untouched: calls without ``trust_remote_code=True``, checkpoints whose ``auto_map`` is not
    ours (DeepSeek's original code, say), subclasses of the built-in classes, a ``config=`` of another class."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as native

    for native_class, auto_class in (
        (native.DeepseekV3ForCausalLM, AutoModelForCausalLM),
        (native.DeepseekV3Model, AutoModel),
    ):
        if getattr(native_class.from_pretrained, "_routes_trusted_remote_code", False):
            continue
        native_class.from_pretrained = classmethod(_routing_from_pretrained(native_class, auto_class))


def _routing_from_pretrained(native_class, auto_class):
    original = native_class.from_pretrained.__func__  # PreTrainedModel.from_pretrained, unbound

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if cls is native_class and kwargs.get("trust_remote_code") is True:
            config = kwargs.get("config")
            if config is None or isinstance(config, str | bytes) or hasattr(config, "__fspath__"):
                config = _trusted_config(config or pretrained_model_name_or_path, kwargs)
            if _is_ours(config):
                return auto_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._routes_trusted_remote_code = True
    from_pretrained.__doc__ = original.__doc__
    return from_pretrained


def _trusted_config(path, kwargs):
    """The config class DIR's ``auto_map`` gives under ``trust_remote_code=True`` (``None`` if it has none or
    cannot be read: the built-in class then reports the problem as it always did)."""
    from transformers import AutoConfig

    try:
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        return AutoConfig.from_pretrained(path, trust_remote_code=True, **hub)
    except (OSError, ValueError):
        return None


def _is_ours(config) -> bool:
    from modeling_deepseekv3.core.configuration import DeepseekV3PluginConfig

    return isinstance(config, DeepseekV3PluginConfig)
