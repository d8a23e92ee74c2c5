"""DeepSeek-V3 configuration: the official ``config.json`` read verbatim, validated, and written back.

The class reads every field of the published DeepSeek-V3 / R1 / V3-0324 / V3.1 / Kimi-K2 / Moonlight
configs (including the legacy ``rope_scaling`` dict, ``quantization_config``, ``num_nextn_predict_layers``,
``topk_method`` and ``scoring_func``) and rejects inconsistent ones with a ``ValueError`` that names the
field, because a silently mis-configured MoE (wrong group count, too many experts per token) produces a
model that runs and is wrong.

Two things differ from a plain transformers config, both on purpose (see ``design.md``):

* ``quantization_config`` of the official FP8 checkpoints is *hidden* from transformers. If transformers
  saw it, its fine-grained FP8 quantizer would dequantize the weights to BF16 on CPU (dropping the scales)
  or swap our modules on a GPU. We keep it as ``fp8_quantization_config`` and write it back under its
  official name in :meth:`to_dict`, so ``save_pretrained`` round-trips the file.
* The class is named ``DeepseekV3PluginConfig`` and exported as ``DeepseekV3Config``: transformers' Auto
  mappings compare config classes by ``__name__``, and a class literally named ``DeepseekV3Config`` would
  be routed to the *native* model by ``AutoModel*.from_config``.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

__all__ = [
    "FP8_COMPUTE_MODES",
    "LATENT_CACHE_FORMATS",
    "MLA_IMPLEMENTATIONS",
    "DeepseekV3Config",
    "DeepseekV3PluginConfig",
    "KimiK2Config",
]

# Allowed values of the plugin knobs, defined here once (attention, cache, CLI and placement import them).
#: ``fp8_compute``: "auto" picks per device (fp8/gpu.py ``resolve_backend``); the others are the backends themselves.
FP8_COMPUTE_MODES = ("auto", "dequant", "native", "scaled_mm", "w8a16")
MLA_IMPLEMENTATIONS = ("auto", "absorb", "expand")
LATENT_CACHE_FORMATS = ("auto", "fp8", "fp8_plain")
# ``pretrain --pp-schedule``: schedule -> placement of its stages (``distributed/pipeline.py``): "v" two per rank in
# a V, "single" one per rank, "loop" two per rank, looped
PIPELINE_SCHEDULES = {"dualpipev": "v", "zbv": "v", "gpipe": "single", "1f1b": "single", "interleaved1f1b": "loop"}

_SUPPORTED_SCORING = ("sigmoid",)
_SUPPORTED_TOPK = ("noaux_tc",)
_MODEL_TYPES = ("deepseek_v3", "kimi_k2")

# Fields derived from others; recomputed on load, never written to config.json.
_DERIVED_FIELDS = ("qk_head_dim", "head_dim", "_checkpoint_model_type")

#: ``model.config.model_type`` of a built model. PEFT 0.21 rewrites LoRA targets for "deepseek_v3" into
#: fused-expert parameters this model does not have (dropping every MLP/expert target); a model built by
#: this package reports this value at run time instead. config.json keeps the official model_type.
RUNTIME_MODEL_TYPE = "deepseek_v3_latent"


class DeepseekV3PluginConfig(PreTrainedConfig):
    r"""Configuration of a DeepSeek-V3-architecture model (V3, R1, V3-0324, V3.1, Kimi-K2, Moonlight).

    Defaults are the published DeepSeek-V3 values, so ``DeepseekV3Config()`` describes the 671B model.
    Field names and meanings are those of the official ``config.json`` (see ``spec/deepseek_v3.md`` §1);
    ``aux_loss_alpha`` is kept as published (0.001) although the paper's balance-loss alpha is 0.0001.

    Plugin knobs (config attributes, so ``from_pretrained(path, knob=value)`` works and they survive
    ``save_pretrained``):

    ``load_mtp`` (bool, default True)
        Build and load the multi-token-prediction layer(s) stored at ``model.layers.{num_hidden_layers}``
        when the checkpoint has them. They never take part in the main forward; False skips them (saves
        ~11.6B parameters on the full model).
    ``dequantize_fp8`` (bool, default False)
        After loading an FP8 checkpoint, replace every FP8 linear by a dense one in the model dtype.
        Trades 2x (BF16) or 4x (FP32) weight memory for not dequantizing on every forward.
    ``fp8_compute`` ("auto" | "dequant" | "native" | "scaled_mm" | "w8a16", default "auto")
        How FP8 linears compute for inference (under autograd every value dequantizes). "dequant":
        block-dequantize the weight each call, then ``F.linear`` (the reference). "native": the CPU kernel
        that reads the FP8 weight directly (1 byte per parameter) with fp32 accumulation, also for the
        absorbed attention's kv_b_proj; built once per machine and cached (``scripts/setup.sh`` does it
        ahead of time); without a C++ compiler or AVX2 it says so once and computes as "dequant" does.
        "scaled_mm": Hopper (SM90, CUDA >= 12.9) FP8 tensor-core GEMMs, activations quantized per 1x128
        tile on the fly, the checkpoint's 128x128 weight scales. "w8a16": a Triton kernel for any CUDA GPU
        (Ampere, Turing, ...) that reads the FP8 weight and dequantizes inside the GEMM tile. "auto": CPU ->
        "native", SM90 -> "scaled_mm", other CUDA GPUs with Triton -> "w8a16", else "dequant". A backend the
        weights' device cannot run is an error naming the device; ``model.fp8_backend()`` shows the choice.
        On CUDA, FP8 routed experts run as grouped W8A16 GEMMs (``moe_grouped_experts``).
    ``moe_grouped_experts`` (bool, default True)
        For inference with dense (BF16/FP32) experts, on a layer's first call re-home its experts' weights
        into two stacked buffers (parameters become views; names and saving unchanged) and run each layer's
        experts as two grouped matmuls. FP8 experts on a CUDA GPU whose ``fp8_compute`` resolves to
        "scaled_mm" or "w8a16" are stacked the same way (FP8 kept) and run as three grouped W8A16 kernels
        over the experts that received tokens. Not used for training or experts spread over devices.
    ``balance_loss_alpha`` (float, default 1e-4), ``routing_bias_update_rate`` (float, default 0.0),
    ``mtp_loss_weight`` (float, default 0.1)
        MoE training controls (``training.py``): the sequence-wise balance loss weight (the official
        ``aux_loss_alpha`` 0.001 is a stale default, spec §9.2), the aux-loss-free bias update rate
        (gamma; 0 = off), and the weight of the MTP loss when the MTP layer is loaded.
    ``mla_impl`` ("auto" | "absorb" | "expand", default "auto")
        Which latent-attention path runs: "expand" re-expands K/V from the cached latent (the reference;
        fast for long prompts), "absorb" attends over the latent itself (decode cost nearly flat in
        context), "auto" picks per call from the two paths' multiply-add counts.
    ``latent_cache_format`` ("auto" | "fp8" | "fp8_plain", default "auto")
        Storage of the latent KV cache: the compute dtype (BF16: 1152 bytes per token per layer),
        FlashMLA's FP8 layout (656 B: e4m3 latent with per-128 FP32 scales + BF16 rope key), or every
        value in e4m3 without scales (576 B). See ``cache.py``.
    """

    model_type = "deepseek_v3"
    # transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under torchrun): the SwiGLU MLPs,
    # shared and routed experts split their intermediate width (gate/up by rows, down by columns; one all-reduce
    # per down projection). MLA stays replicated, as in native's plan. FP8 linears shard ``weight`` and
    # ``weight_scale_inv`` together and compute on their local blocks (distributed/tensor_parallel.py refuses a
    # tp size that cuts a 128-block).
    base_model_tp_plan = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.experts.*.gate_proj": "colwise",
        "layers.*.mlp.experts.*.up_proj": "colwise",
        "layers.*.mlp.experts.*.down_proj": "rowwise",
    }
    attribute_map = {
        "num_local_experts": "n_routed_experts",
        "num_mtp_layers": "num_nextn_predict_layers",
    }

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int = 256
    ep_size: int = 1
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    output_router_logits: bool = False  # transformers' MoE convention: return each MoE layer's router logits
    # --- plugin knobs -------------------------------------------------------------------------
    load_mtp: bool = True
    dequantize_fp8: bool = False
    fp8_compute: str = "auto"
    balance_loss_alpha: float = 1e-4
    routing_bias_update_rate: float = 0.0
    mtp_loss_weight: float = 0.1
    moe_grouped_experts: bool = True
    mla_impl: str = "auto"
    latent_cache_format: str = "auto"

    def __post_init__(self, **kwargs):
        own_type = kwargs.get("model_type", self.__dict__.get("model_type"))
        if own_type in _MODEL_TYPES:
            self._checkpoint_model_type = own_type  # e.g. Kimi-K2's "kimi_k2", written back on save
        quant = kwargs.pop("quantization_config", None)
        self.fp8_quantization_config = None
        if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
            self.fp8_quantization_config = _normalize_fp8_config(quant)
        elif quant is not None:
            # Any other method (e.g. bitsandbytes for QLoRA) is transformers' business: leave it visible.
            kwargs["quantization_config"] = quant
        # transformers merges rope keys into these dicts in place; never mutate the caller's config dict.
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = dict(self.rope_parameters)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        # transformers' rope utilities read `head_dim` as the rotary width; for MLA that is the rope part.
        self.head_dim = self.qk_rope_head_dim
        super().__post_init__(**kwargs)
        self.validate_deepseek()

    # ------------------------------------------------------------------------------------------
    # derived views
    @property
    def is_fp8(self) -> bool:
        """True when the checkpoint format is block-scaled FP8 (official V3 / R1 / V3.1 / Kimi-K2)."""
        return self.fp8_quantization_config is not None

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        if self.fp8_quantization_config is None:
            return None
        bm, bn = self.fp8_quantization_config["weight_block_size"]
        return int(bm), int(bn)

    @property
    def fp8_scale_fmt(self) -> str | None:
        """``"ue8m0"`` (V3.1: power-of-two scales) or None (plain FP32 scales)."""
        if self.fp8_quantization_config is None:
            return None
        return self.fp8_quantization_config.get("scale_fmt")

    @property
    def num_mtp_modules(self) -> int:
        """MTP layers this config builds (0 when absent or skipped with ``load_mtp=False``)."""
        return self.num_nextn_predict_layers if self.load_mtp else 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Spec §6: layer ``i`` is MoE iff ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``.

        MTP layers (indices ``>= num_hidden_layers``) follow the same rule, so in V3 they are MoE blocks.
        """
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def yarn_parameters(self) -> dict[str, Any] | None:
        rp = self.rope_parameters or {}
        return rp if rp.get("rope_type", rp.get("type")) == "yarn" else None

    @property
    def rope_theta(self) -> float:
        theta = (self.rope_parameters or {}).get("rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"config field `rope_theta` must be a positive number, got {theta!r}.")
        return float(theta)

    # ------------------------------------------------------------------------------------------
    def validate_deepseek(self) -> None:
        """Raise ``ValueError`` naming the field for every inconsistency we can detect up front."""
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
            "moe_layer_freq",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field `{name}` must be a positive integer, got {value!r}.")
        for name in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config field `{name}` must be a non-negative integer, got {value!r}.")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or isinstance(self.q_lora_rank, bool) or self.q_lora_rank <= 0
        ):
            raise ValueError(
                f"config field `q_lora_rank` must be a positive integer, or null for a direct q_proj "
                f"(as in Moonlight); got {self.q_lora_rank!r}."
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"config field `qk_rope_head_dim` must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}."
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"config field `n_group` ({self.n_group}) must divide `n_routed_experts` "
                f"({self.n_routed_experts}): experts are split into equal contiguous groups."
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"config field `topk_group` ({self.topk_group}) cannot exceed `n_group` ({self.n_group})."
            )
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > kept:
            raise ValueError(
                f"config field `num_experts_per_tok` ({self.num_experts_per_tok}) is larger than the "
                f"{kept} experts left in the `topk_group`={self.topk_group} kept groups "
                f"({self.n_routed_experts // self.n_group} experts per group)."
            )
        if self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
            raise ValueError(
                f"config field `n_group` ({self.n_group}) leaves fewer than 2 experts per group; the group "
                "score is the sum of each group's top-2 experts."
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"config field `first_k_dense_replace` ({self.first_k_dense_replace}) is larger than "
                f"`num_hidden_layers` ({self.num_hidden_layers})."
            )
        if self.scoring_func not in _SUPPORTED_SCORING:
            raise ValueError(
                f"config field `scoring_func` is {self.scoring_func!r}; this package implements the "
                f"DeepSeek-V3 router, which needs {_SUPPORTED_SCORING[0]!r}."
            )
        if self.topk_method not in _SUPPORTED_TOPK:
            raise ValueError(
                f"config field `topk_method` is {self.topk_method!r}; this package implements the "
                f"aux-loss-free group-limited router, {_SUPPORTED_TOPK[0]!r}."
            )
        for name, allowed in (
            ("fp8_compute", FP8_COMPUTE_MODES),
            ("mla_impl", MLA_IMPLEMENTATIONS),
            ("latent_cache_format", LATENT_CACHE_FORMATS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field `{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"config field `hidden_act` is {self.hidden_act!r}, which transformers does not know.")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            raise ValueError(
                f"config field `routed_scaling_factor` must be > 0, got {self.routed_scaling_factor!r}."
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"config field `rms_norm_eps` must be > 0, got {self.rms_norm_eps!r}.")
        if not (isinstance(self.attention_dropout, (int, float)) and 0 <= self.attention_dropout < 1):
            raise ValueError(f"config field `attention_dropout` must be in [0, 1), got {self.attention_dropout!r}.")
        self.rope_theta  # noqa: B018 -- the property validates the value, naming the field
        yarn = self.yarn_parameters
        if yarn is not None:
            factor = yarn.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                raise ValueError(f"config field `rope_scaling.factor` must be >= 1 for YaRN, got {factor!r}.")
            omp = yarn.get("original_max_position_embeddings")
            if not isinstance(omp, int) or omp <= 0:
                raise ValueError(
                    "config field `rope_scaling.original_max_position_embeddings` must be a positive integer "
                    f"for YaRN, got {omp!r}."
                )
        else:
            check_rope_type(self)  # default, linear, dynamic (or an error naming the field)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Serialize in the official layout: legacy ``rope_scaling``/``rope_theta`` (what vLLM, SGLang and
        older transformers read), ``quantization_config`` re-emitted, derived fields dropped."""
        out = super().to_dict()
        out["model_type"] = self.__dict__.get("_checkpoint_model_type") or type(self).model_type
        for name in _DERIVED_FIELDS:
            out.pop(name, None)
        fp8 = out.pop("fp8_quantization_config", None)
        if fp8 is not None:
            out["quantization_config"] = dict(fp8)
        rope = out.pop("rope_parameters", None) or {}
        rope = dict(rope)
        out["rope_theta"] = rope.pop("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", "default")
        rope.pop("type", None)
        out["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        return out


def _normalize_fp8_config(quant: dict) -> dict:
    """Validate an official FP8 ``quantization_config`` and return a copy (keys as published)."""
    quant = dict(quant)
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config field `quantization_config.fmt` is {fmt!r}; only 'e4m3' FP8 is supported.")
    block = quant.get("weight_block_size")
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            "config field `quantization_config.weight_block_size` must be two positive integers such as "
            f"[128, 128]; got {block!r}. Per-tensor or per-channel FP8 is not the DeepSeek format."
        )
    quant["weight_block_size"] = [int(b) for b in block]
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(
            f"config field `quantization_config.activation_scheme` is {scheme!r}; DeepSeek FP8 uses 'dynamic'."
        )
    scale_fmt = quant.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(
            f"config field `quantization_config.scale_fmt` is {scale_fmt!r}; expected null or 'ue8m0' (V3.1)."
        )
    return quant


# rope types the model implements (rope.py): YaRN for the released models; linear and dynamic as in transformers
ROPE_TYPES = ("default", "yarn", "linear", "dynamic")


def rope_type(config) -> str:
    rope = config.rope_parameters or {}
    return rope.get("rope_type", rope.get("type", "default"))


def check_rope_type(config) -> None:
    """Only the rope types implemented here: a config edited after validation must not silently lose the
    scaling it asks for."""
    kind = rope_type(config)
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config field `rope_scaling.type` is {kind!r}; this model implements {', '.join(ROPE_TYPES[1:])} or "
            "none (DeepSeek-V3 models use 'yarn'; it would otherwise run without the scaling you asked for)."
        )
    if kind in ("linear", "dynamic"):
        factor = (config.rope_parameters or {}).get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
            raise ValueError(f"config field `rope_scaling.factor` must be a number >= 1 for {kind!r}, got {factor!r}.")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-magnitude factor ``0.1 * mscale * ln(scale) + 1`` (1.0 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class KimiK2Config(DeepseekV3PluginConfig):
    """Kimi-K2's ``model_type: kimi_k2`` (same architecture; 384 experts, one group, its own YaRN betas).

    Only needed for transformers' Auto mappings (``register()``); ``DeepseekV3Config`` reads Kimi-K2's
    config.json as well and keeps its ``model_type`` on save."""

    model_type = "kimi_k2"


DeepseekV3Config = DeepseekV3PluginConfig
