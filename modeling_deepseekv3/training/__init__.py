"""Training: DeepSeek-V3's losses (balance, MTP), the aux-loss-free routing-bias update, the FP8 training recipe
(implemented in ``fp8/training.py``), AdamW with BF16 moments, the pretraining command, Trainer callbacks.

``RoutingBiasCallback`` is imported on first use (it pulls in transformers' Trainer modules).
"""

from ..core.losses import balance_loss, mtp_loss, next_token_labels
from ..fp8.training import FP8TrainingRecipe, convert_from_fp8_training, convert_to_fp8_training
from .balance import ExpertLoadTracker, expert_load, reset_expert_load, track_expert_load, update_routing_bias
from .optim import AdamWBF16Moments

__all__ = [
    "AdamWBF16Moments",
    "ExpertLoadTracker",
    "FP8TrainingRecipe",
    "RoutingBiasCallback",
    "balance_loss",
    "convert_from_fp8_training",
    "convert_to_fp8_training",
    "expert_load",
    "mtp_loss",
    "next_token_labels",
    "reset_expert_load",
    "track_expert_load",
    "update_routing_bias",
]


def __getattr__(name: str):
    if name == "RoutingBiasCallback":
        from .callbacks import RoutingBiasCallback

        return RoutingBiasCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
