"""``trust_remote_code`` shim: DeepSeek-V3-family checkpoints (V3, R1, V3-0324, V3.1, Kimi-K2, Moonlight) load with
the installed ``modeling_deepseekv3`` package (``pip install modeling_deepseekv3``), FP8 weights kept as FP8.

``config.json``'s ``auto_map`` names ``configuration_deepseek.DeepseekV3Config`` (the name DeepSeek's own repositories
use), so ``AutoConfig/AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``, ``pipeline(...,
trust_remote_code=True)``, lm-eval and TRL given the path reach this package with no import of it in the caller.
Every checkpoint ``modeling_deepseekv3`` writes carries this file; ``deepseek-v3 install-hub-files DIR`` adds it (and
the ``auto_map``) to other checkouts, keeping DeepSeek's originals as ``*.orig``. No logic lives here: copies of this
file outlive upgrades of the package.
"""

import modeling_deepseekv3 as _plugin
from modeling_deepseekv3.hub_files import route_trusted_native_loads


class DeepseekV3RemoteConfig(_plugin.DeepseekV3PluginConfig):
    """The plugin config under a name of its own: transformers' Auto mappings compare config classes by
    ``__name__``, and one named ``DeepseekV3Config`` would be mistaken for transformers' built-in."""


DeepseekV3Config = DeepseekV3RemoteConfig  # the name auto_map asks for

# tools that load AutoConfig(trust_remote_code=True) and then transformers' class named by config.architectures
# (TRL, transformers serve) get ours too; see modeling_deepseekv3.hub_files.route_trusted_native_loads
route_trusted_native_loads()
