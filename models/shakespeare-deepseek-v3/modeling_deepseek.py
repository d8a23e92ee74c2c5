"""``trust_remote_code`` shim: the model classes ``auto_map`` names, from the installed ``modeling_deepseekv3``
package (see ``configuration_deepseek.py``).

They are subclasses, not the package's classes themselves: transformers marks a remote class for saving its
source file along with the weights, and that must be this small file, never the package's modules."""

import modeling_deepseekv3 as _plugin

from .configuration_deepseek import DeepseekV3RemoteConfig


class DeepseekV3PreTrainedModel(_plugin.DeepseekV3PreTrainedModel):
    config_class = DeepseekV3RemoteConfig


class DeepseekV3Model(_plugin.DeepseekV3Model):
    config_class = DeepseekV3RemoteConfig


class DeepseekV3ForCausalLM(_plugin.DeepseekV3ForCausalLM):
    config_class = DeepseekV3RemoteConfig
