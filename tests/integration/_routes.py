"""Run one loading route in a fresh process (registration is process-wide) and print a JSON report.

python tests/integration/_routes.py ROUTE CHECKPOINT_DIR
"""

import json
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

route, path = sys.argv[1], sys.argv[2]
transformers.logging.set_verbosity_error()
report = {}
if route == "class":
    import modeling_deepseekv3 as ds

    model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    pipe = pipeline("text-generation", model=model, tokenizer=ds.load_tokenizer(path))
elif route == "register":
    import modeling_deepseekv3 as ds

    ds.register(override_native=True)
    ds.register(override_native=True)  # idempotent
    report["config_class"] = type(AutoConfig.from_pretrained(path)).__name__
    pipe = pipeline("text-generation", model=path, dtype=torch.float32)
elif route == "remote":
    pipe = pipeline("text-generation", model=path, dtype=torch.float32, trust_remote_code=True)
    report["config_class"] = type(pipe.model.config).__name__
    pipe.model.save_pretrained(sys.argv[3])
elif route == "native":
    import modeling_deepseekv3  # noqa: F401  (importing must register nothing)

    report["config_class"] = type(AutoConfig.from_pretrained(path)).__name__
    report["model_module"] = AutoModelForCausalLM.from_pretrained(path).__class__.__module__
    print(json.dumps(report))
    sys.exit(0)
elif route == "kimi":
    import modeling_deepseekv3 as ds

    ds.register()
    report["config_class"] = type(AutoConfig.from_pretrained(path)).__name__
    report["model_class"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).__class__.__name__
    import transformers.models.deepseek_v3 as native

    report["native_still_native"] = AutoModelForCausalLM.from_config(
        native.DeepseekV3Config(**{k: v for k, v in ds.checkpoint.TINY_CONFIG.items()})
    ).__class__.__module__
    print(json.dumps(report))
    sys.exit(0)
model = pipe.model
report["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
report["is_ours"] = any(c.__module__ == "modeling_deepseekv3.modeling" for c in type(model).__mro__)
report["fp8"] = str(model.model.layers[1].self_attn.q_b_proj.weight.dtype)
messages = [{"role": "user", "content": "What is two plus two?"}]
out = pipe(messages, max_new_tokens=12, min_new_tokens=12, do_sample=False)
report["chat"] = out[0]["generated_text"][-1]["content"]
report["text"] = pipe("The sea is", max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
print(json.dumps(report))
