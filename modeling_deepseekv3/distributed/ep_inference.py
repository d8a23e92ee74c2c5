"""Expert-parallel inference through transformers' own argument:
``from_pretrained(path, distributed_config=DistributedConfig(tp_size=N, ep_size=N, tp_plan={}))`` under torchrun.

Each rank loads and runs only its 1/N of every MoE layer's routed experts (the others are never read from disk),
the dense modules are replicated, and every rank must run the same batch: the partial expert outputs are summed
over the ranks (:class:`~.expert_parallel.SharedBatchExpertDispatcher` in each layer's dispatch seam).
transformers' own EP plans shard fused 3-D expert tensors this model does not have, so the request is taken here.
``tp_plan="auto"`` is transformers' tensor parallelism on the plan the config declares, untouched.

The experts must be replaced after the skeleton exists and before any weight is read, which happens inside
transformers' private ``_load_pretrained_model``; the size asked for travels there in a context variable set for
the duration of the ``from_pretrained`` call. ``PRIVATE_API`` records the signature this was written against.
"""

from __future__ import annotations

import contextvars
import os

import torch

from .expert_parallel import expert_parallel_inference_ranks, shard_experts_for_inference

__all__ = ["PRIVATE_API", "ExpertParallelInference"]

PRIVATE_API = {
    "PreTrainedModel._load_pretrained_model": (
        "model",
        "state_dict",
        "checkpoint_files",
        "load_config",
        "expected_keys",
    ),
}

# ranks of the from_pretrained call in progress (1: no expert parallelism)
_PENDING_RANKS = contextvars.ContextVar("deepseekv3_expert_parallel_ranks", default=1)


class ExpertParallelInference:
    """Mixed in before the loading feature (``modeling.py``): takes ``distributed_config`` with ``ep_size > 1``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        ranks = 1
        if kwargs.get("distributed_config") is not None:
            ranks = expert_parallel_inference_ranks(kwargs["distributed_config"])
            if ranks > 1:  # ours, not transformers' EP plans
                kwargs.pop("distributed_config")
                if torch.cuda.is_available() and kwargs.get("device_map") is None:
                    kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        token = _PENDING_RANKS.set(ranks)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finally:
            _PENDING_RANKS.reset(token)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        ranks = _PENDING_RANKS.get()
        if ranks > 1:  # before any weight is read: the other ranks' experts are never loaded here
            shard_experts_for_inference(model, ranks)
            model._keys_to_ignore_on_load_unexpected = {
                *(model._keys_to_ignore_on_load_unexpected or ()),
                r"mlp\.experts\.\d+\.",
            }
            if expected_keys is not None:
                expected_keys = list(model.state_dict().keys())
        parent = super(ExpertParallelInference, type(model))._load_pretrained_model
        return parent(model, state_dict, checkpoint_files, load_config, expected_keys)
