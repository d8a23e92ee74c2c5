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
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
report = {}
try:
    model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto")
except ValueError as exc:  # a refused layout: every rank must say so
    report = {"error": str(exc)}
else:
    ids = torch.randint(2, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    report = {"sharded": type(model.model.layers[1].mlp.experts[0].gate_proj.weight).__name__}
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
