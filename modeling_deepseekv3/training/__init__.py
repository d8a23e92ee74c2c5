"""Training: DeepSeek-V3's losses (balance, MTP), the aux-loss-free routing-bias update, the FP8 training recipe
(implemented in ``fp8/training.py``), AdamW with BF16 moments, the pretraining command, Trainer callbacks.

Each name loads its module on first use (PEP 562): the CLI reads the pretrain flags (:mod:`.args`) at start-up
without importing torch, and ``RoutingBiasCallback`` pulls in transformers' Trainer modules only when asked for.
"""

from __future__ import annotations

from .._lazy import lazy_exports

#: public name -> the module that defines it (relative to this package)
_EXPORTS = {
    "balance_loss": "..core.losses",
    "mtp_loss": "..core.losses",
    "next_token_labels": "..core.losses",
    "FP8TrainingRecipe": "..fp8.training",
    "convert_from_fp8_training": "..fp8.training",
    "convert_to_fp8_training": "..fp8.training",
    "ExpertLoadTracker": ".balance",
    "expert_load": ".balance",
    "reset_expert_load": ".balance",
    "track_expert_load": ".balance",
    "update_routing_bias": ".balance",
    "AdamWBF16Moments": ".optim",
    "RoutingBiasCallback": ".callbacks",
}
__all__ = sorted(_EXPORTS, key=str.lower)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
