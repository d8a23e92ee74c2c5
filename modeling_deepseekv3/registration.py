"""``register()``: the explicit, opt-in route for ``AutoConfig`` / ``AutoModel*`` to reach this package.

Nothing is registered at import time. ``register()`` adds our classes to transformers' Auto mappings
for our own config classes (``AutoModelForCausalLM.from_config(our_config)`` and ``pipeline(model=ours)``
then know them) and claims Kimi-K2's ``kimi_k2`` model type, which transformers does not have.
``register(override_native=True)`` also makes ``deepseek_v3`` checkouts resolve to our classes for the
rest of the process -- transformers' built-in DeepSeek-V3 is then out of reach in that process (even
``trust_remote_code=True`` loads prefer a registered class). Calling it again is a no-op.
"""

from __future__ import annotations

from .core.configuration import DeepseekV3PluginConfig, KimiK2Config

__all__ = ["is_registered", "register"]

_state = {"plain": False, "override": False}


def register(override_native: bool = False) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .modeling import DeepseekV3ForCausalLM, DeepseekV3Model, KimiK2ForCausalLM, KimiK2Model

    if not _state["plain"]:
        AutoConfig.register("kimi_k2", KimiK2Config, exist_ok=True)
        for config_class, base, causal in (
            (DeepseekV3PluginConfig, DeepseekV3Model, DeepseekV3ForCausalLM),
            (KimiK2Config, KimiK2Model, KimiK2ForCausalLM),
        ):
            AutoModel.register(config_class, base, exist_ok=True)
            AutoModelForCausalLM.register(config_class, causal, exist_ok=True)
        _state["plain"] = True
    if override_native and not _state["override"]:
        AutoConfig.register("deepseek_v3", DeepseekV3PluginConfig, exist_ok=True)
        _state["override"] = True


def is_registered(override_native: bool = False) -> bool:
    return _state["override"] if override_native else _state["plain"]
