"""``trust_remote_code`` shim for DeepSeek-V3-family checkouts (V3, R1, V3-0324, V3.1, Kimi-K2).

The official ``config.json`` names ``configuration_deepseek.DeepseekV3Config`` in its ``auto_map``. With
this file (and ``modeling_deepseek.py``) in the checkout -- ``deepseek-v3 install-hub-files DIR`` puts them
there and keeps DeepSeek's originals as ``*.orig`` -- ``AutoConfig/AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` and ``pipeline(..., trust_remote_code=True)`` use the installed
``modeling_deepseekv3`` package (pip install modeling_deepseekv3) with no edit to config.json.
"""

from modeling_deepseekv3.core.configuration import DeepseekV3PluginConfig


class DeepseekV3RemoteConfig(DeepseekV3PluginConfig):
    """The plugin config, under a name of its own: transformers' Auto mappings compare config classes by
    ``__name__``, and one named ``DeepseekV3Config`` would be mistaken for transformers' built-in."""


DeepseekV3Config = DeepseekV3RemoteConfig  # the name auto_map asks for
