"""One rank of a ``tp_plan="auto"`` run (started by torchrun from test_distributed.py); rank 0 writes a JSON report.

torchrun --nproc-per-node 2 tests/integration/_tp_worker.py CHECKPOINT_DIR REPORT.json
"""

import json
import sys

import torch
import torch.distributed as dist
import transformers

import modeling_deepseekv3 as ds

path, report_path = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "tp"
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
report = {}
try:
    if mode == "ep":  # expert parallelism: each rank loads and runs half of the routed experts
        from transformers.distributed import DistributedConfig

        config = DistributedConfig(tp_size=2, ep_size=2, tp_plan={})
        model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, distributed_config=config)
    else:
        model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto")
except ValueError as exc:  # a refused layout: every rank must say so
    report = {"error": str(exc)}
else:
    ids = torch.randint(2, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    experts = model.model.layers[1].mlp.experts
    held = [e for e in range(len(experts)) if type(experts[e]).__name__ != "RemoteExpert"]
    report = {"held_experts": held} if mode == "ep" else {"sharded": type(experts[0].gate_proj.weight).__name__}
    if dist.get_rank() == 0:
        ref = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            report["max_diff"] = (ref(ids).logits - logits).abs().max().item()
        report["generate_equal"] = torch.equal(tokens, ref.generate(ids[:1], max_new_tokens=6, do_sample=False))
rank = dist.get_rank() if dist.is_initialized() else int(__import__("os").environ.get("RANK", "0"))
with open(f"{report_path}.{rank}", "w") as f:
    json.dump(report, f)
if dist.is_initialized():
    dist.destroy_process_group()
