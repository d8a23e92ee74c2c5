"""Training: DeepSeek-V3's losses (balance, MTP), the aux-loss-free routing-bias update, Trainer callbacks.

``RoutingBiasCallback`` is imported on first use (it pulls in transformers' Trainer modules).
"""

from .balance import ExpertLoadTracker, expert_load, reset_expert_load, track_expert_load, update_routing_bias
from .losses import balance_loss, mtp_loss, next_token_labels

__all__ = [
    "ExpertLoadTracker",
    "RoutingBiasCallback",
    "balance_loss",
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
