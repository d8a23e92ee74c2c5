"""``trust_remote_code`` shim: the classes the official ``auto_map`` names, from the installed
``modeling_deepseekv3`` package (see ``configuration_deepseek.py``)."""

from modeling_deepseekv3 import modeling as _plugin

from .configuration_deepseek import DeepseekV3RemoteConfig


class DeepseekV3PreTrainedModel(_plugin.DeepseekV3PreTrainedModel):
    config_class = DeepseekV3RemoteConfig


class DeepseekV3Model(_plugin.DeepseekV3Model):
    config_class = DeepseekV3RemoteConfig


class DeepseekV3ForCausalLM(_plugin.DeepseekV3ForCausalLM):
    config_class = DeepseekV3RemoteConfig
