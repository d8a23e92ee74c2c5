"""``transformers.Trainer`` callbacks for DeepSeek-V3 training (imported on use: Trainer's modules are heavy)."""

from __future__ import annotations

from transformers import TrainerCallback

from .balance import track_expert_load, update_routing_bias

__all__ = ["RoutingBiasCallback"]


class RoutingBiasCallback(TrainerCallback):
    """``Trainer`` callback: counts expert load, updates the routing biases after every optimizer step
    (rate ``gamma`` or the config's ``routing_bias_update_rate``; 0 only logs), and adds
    ``moe_load_imbalance`` (max/mean tokens per expert, averaged over layers) to the logs."""

    def __init__(self, gamma: float | None = None):
        self.gamma = gamma
        self._last = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        track_expert_load(model, True, training_only=True)  # Trainer evaluates between steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._last = update_routing_bias(model, self.gamma)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._last:
            value = sum(self._last.values()) / len(self._last)
            logs["moe_load_imbalance"] = value  # what printers / reporters see
            if state.log_history:  # Trainer appended its copy before calling us
                state.log_history[-1]["moe_load_imbalance"] = value
