"""The public classes: the core model (``core/``) with the features that attach to it from outside.

Each feature is a mixin in its own module, listed here before the core class it wraps, so its methods run first
and hand over with ``super()``:

* :class:`~.generation.hooks.DeepseekV3GenerationMixin`: the latent cache in ``generate()``, the context limit,
  MTP speculative decoding (``use_mtp=True``);
* :class:`~.generation.continuous_batching.ContinuousBatchingSupport`: transformers' continuous batching
  (``generate_batch``, ``transformers serve --continuous-batching``) on the paged latent cache;
* :class:`~.distributed.ep_inference.ExpertParallelInference`: ``distributed_config`` with ``ep_size > 1``;
* :class:`~.loading.OfficialCheckpointLoading`: official-layout ``from_pretrained`` / ``save_pretrained`` (FP8
  kept, the checks);
* :class:`~.integrations.peft_hook.PlainPeftSupport`: plain PEFT LoRA scripts on FP8 models, expert targets kept.

Nothing else lives here: placement, parallel training, FP8 training and the other integrations act on a built
model from their own modules.
"""

from __future__ import annotations

from .core import model as core
from .core.configuration import KimiK2Config
from .core.decoder import DeepseekV3DecoderLayer
from .core.model import DeepseekV3CausalLMOutput, DeepseekV3ModelOutput
from .core.mtp import DeepseekV3MTPLayer
from .distributed.ep_inference import ExpertParallelInference
from .generation.continuous_batching import ContinuousBatchingSupport
from .generation.hooks import DeepseekV3GenerationMixin
from .integrations.peft_hook import PlainPeftSupport
from .loading import OfficialCheckpointLoading

__all__ = [
    "DeepseekV3CausalLMOutput",
    "DeepseekV3DecoderLayer",
    "DeepseekV3ForCausalLM",
    "DeepseekV3MTPLayer",
    "DeepseekV3Model",
    "DeepseekV3ModelOutput",
    "DeepseekV3PreTrainedModel",
    "KimiK2ForCausalLM",
    "KimiK2Model",
]


class DeepseekV3PreTrainedModel(
    ExpertParallelInference, OfficialCheckpointLoading, PlainPeftSupport, core.DeepseekV3PreTrainedModel
):
    """The core's shared base with loading, expert-parallel inference and PEFT support attached."""


class DeepseekV3Model(DeepseekV3PreTrainedModel, core.DeepseekV3Model):
    """Embedding, decoder layers, final norm, the MTP layer(s) when loaded (``core/model.py``)."""


class DeepseekV3ForCausalLM(
    ContinuousBatchingSupport, DeepseekV3GenerationMixin, DeepseekV3PreTrainedModel, core.DeepseekV3ForCausalLM
):
    """``DeepseekV3Model`` + ``lm_head`` and DeepSeek-V3's objective (``core/model.py``), ``generate()`` with MTP."""

    base_model_class = DeepseekV3Model


class KimiK2Model(DeepseekV3Model):
    """``DeepseekV3Model`` bound to ``KimiK2Config`` (transformers' Auto mappings key on the config class)."""

    config_class = KimiK2Config


class KimiK2ForCausalLM(DeepseekV3ForCausalLM):
    config_class = KimiK2Config
    base_model_class = KimiK2Model
