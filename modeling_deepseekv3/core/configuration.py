"""DeepSeek-V3 configuration: the official ``config.json`` read verbatim, validated, and written back.

The class reads every field of the published DeepSeek-V3 / R1 / V3-0324 / V3.1 / Kimi-K2 / Moonlight
configs (including the legacy ``rope_scaling`` dict, ``quantization_config``, ``num_nextn_predict_layers``,
``topk_method`` and ``scoring_func``) and rejects inconsistent ones with a ``ValueError`` that names the
field, because a silently mis-configured MoE (wrong group count, too many experts per token) produces a
model that runs and is wrong.

Two things differ from a plain transformers config, both on purpose:

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

from ..fp8 import FP8_COMPUTE_MODES
from .options import LATENT_CACHE_FORMATS, MLA_IMPLEMENTATIONS

__all__ = [
    "FP8_COMPUTE_MODES",
    "LATENT_CACHE_FORMATS",
    "MLA_IMPLEMENTATIONS",
    "DeepseekV3Config",
    "DeepseekV3PluginConfig",
    "KimiK2Config",
]

# earlier name of "dtype" (it chose nothing): configs saved with it still load, as "dtype"
_LATENT_CACHE_FORMAT_ALIASES = {"auto": "dtype"}

_SUPPORTED_SCORING = ("sigmoid",)
_SUPPORTED_TOPK = ("noaux_tc",)
_MODEL_TYPES = ("deepseek_v3", "kimi_k2")

# Fields derived from others; recomputed on load, never written to config.json.
_DERIVED_FIELDS = ("qk_head_dim", "head_dim", "_checkpoint_model_type")


class DeepseekV3PluginConfig(PreTrainedConfig):
    r"""Configuration of a DeepSeek-V3-architecture model (V3, R1, V3-0324, V3.1, Kimi-K2, Moonlight).

    Defaults are the published DeepSeek-V3 values, so ``DeepseekV3Config()`` describes the 671B model.
    Field names and meanings are those of the official ``config.json`` (see ``docs/deepseek_v3.md`` §1);
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
        MoE training controls (``core/losses.py``, ``training/balance.py``): the sequence-wise balance loss weight (the official
        ``aux_loss_alpha`` 0.001 is a stale default, docs/deepseek_v3.md §9.2), the aux-loss-free bias update rate
        (gamma; 0 = off), and the weight of the MTP loss when the MTP layer is loaded.
    ``mla_impl`` ("auto" | "absorb" | "expand", default "auto")
        Which latent-attention path runs: "expand" re-expands K/V from the cached latent (the reference;
        fast for long prompts), "absorb" attends over the latent itself (decode cost nearly flat in
        context), "auto" picks per call from the two paths' multiply-add counts.
    ``latent_cache_format`` ("dtype" | "fp8" | "fp8_plain", default "dtype"; "auto" is read as "dtype")
        Storage of the latent KV cache: the model's compute dtype (BF16: 1152 bytes per token per layer),
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
    latent_cache_format: str = "dtype"

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
        _check_rope_dict_shape("rope_scaling", kwargs.get("rope_scaling"))
        _check_rope_dict_shape("rope_parameters", self.rope_parameters)
        # transformers merges rope keys into these dicts in place; never mutate the caller's config dict.
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = dict(self.rope_parameters)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        self.latent_cache_format = _LATENT_CACHE_FORMAT_ALIASES.get(self.latent_cache_format, self.latent_cache_format)
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
        """docs/deepseek_v3.md §6: layer ``i`` is MoE iff ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``.

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
        if not (_finite(theta) and theta > 0):
            raise ValueError(f"config field `rope_theta` must be a finite positive number, got {theta!r}.")
        return float(theta)

    # ------------------------------------------------------------------------------------------
    def validate_deepseek(self) -> None:
        """Raise ``ValueError`` naming the field for every inconsistency we can detect up front.

        The checks are tables (module level, below the class): each field's own type and range, then the
        relations between fields (which may assume the types are right), then the rope parameters. NaN,
        infinity or a negative scale is refused like a missing value: the forward would not raise on it, it
        would return NaN logits."""
        for name, ok, expected in _FIELD_RULES:
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"config field `{name}` " + expected.format(value=value))
        for name, ok, explain in _RELATION_RULES:
            if not ok(self):
                raise ValueError(f"config field `{name}` " + explain(self))
        _check_parameter_estimate(self)
        self.rope_theta  # noqa: B018 -- the property validates the value, naming the field
        yarn = self.yarn_parameters
        if yarn is not None:
            for key, ok, expected in _YARN_RULES:
                value = yarn.get(key)
                if not ok(value):
                    raise ValueError(f"config field `rope_scaling.{key}` " + expected.format(value=value))
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


# ----------------------------------------------------------------------------------------------
# Validation tables. Each row: (field, predicate, what is expected). A field row's text is completed with
# ``.format(value=...)``; a relation row's text is a function of the config, as it quotes other fields.


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    """A real number that arithmetic keeps meaningful: JSON's NaN and Infinity parse as floats too."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _known_activation(value) -> bool:
    from transformers.activations import ACT2FN

    return isinstance(value, str) and value in ACT2FN


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "max_position_embeddings",
    "moe_layer_freq",
)
_NON_NEGATIVE_INTS = ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace")
# loss weights, rates and the init scale: 0 switches the term off, a negative value is never meant
_NON_NEGATIVE_REALS = (
    "aux_loss_alpha",
    "initializer_range",
    "balance_loss_alpha",
    "routing_bias_update_rate",
    "mtp_loss_weight",
)

_FIELD_RULES: tuple[tuple[str, Any, str], ...] = (
    *((name, lambda v: _int(v) and v > 0, "must be a positive integer, got {value!r}.") for name in _POSITIVE_INTS),
    *(
        (name, lambda v: _int(v) and v >= 0, "must be a non-negative integer, got {value!r}.")
        for name in _NON_NEGATIVE_INTS
    ),
    (
        "q_lora_rank",
        lambda v: v is None or (_int(v) and v > 0),
        "must be a positive integer, or null for a direct q_proj (as in Moonlight); got {value!r}.",
    ),
    (
        "scoring_func",
        lambda v: v in _SUPPORTED_SCORING,
        f"is {{value!r}}; this package implements the DeepSeek-V3 router, which needs {_SUPPORTED_SCORING[0]!r}.",
    ),
    (
        "topk_method",
        lambda v: v in _SUPPORTED_TOPK,
        f"is {{value!r}}; this package implements the aux-loss-free group-limited router, {_SUPPORTED_TOPK[0]!r}.",
    ),
    ("fp8_compute", lambda v: v in FP8_COMPUTE_MODES, f"must be one of {FP8_COMPUTE_MODES}, got {{value!r}}."),
    ("mla_impl", lambda v: v in MLA_IMPLEMENTATIONS, f"must be one of {MLA_IMPLEMENTATIONS}, got {{value!r}}."),
    (
        "latent_cache_format",
        lambda v: v in LATENT_CACHE_FORMATS,
        f"must be one of {LATENT_CACHE_FORMATS}, got {{value!r}}.",
    ),
    ("hidden_act", _known_activation, "is {value!r}, which transformers does not know."),
    ("routed_scaling_factor", lambda v: _finite(v) and v > 0, "must be a finite number > 0, got {value!r}."),
    ("rms_norm_eps", lambda v: _finite(v) and v > 0, "must be a finite number > 0, got {value!r}."),
    ("attention_dropout", lambda v: _finite(v) and 0 <= v < 1, "must be a number in [0, 1), got {value!r}."),
    *(
        (name, lambda v: _finite(v) and v >= 0, "must be a finite number >= 0, got {value!r}.")
        for name in _NON_NEGATIVE_REALS
    ),
)


def _experts_per_group(c) -> int:
    return c.n_routed_experts // c.n_group


_RELATION_RULES: tuple[tuple[str, Any, Any], ...] = (
    (
        "qk_rope_head_dim",
        lambda c: c.qk_rope_head_dim % 2 == 0,
        lambda c: f"must be even (RoPE rotates pairs), got {c.qk_rope_head_dim}.",
    ),
    (
        "n_group",
        lambda c: c.n_routed_experts % c.n_group == 0,
        lambda c: (
            f"({c.n_group}) must divide `n_routed_experts` ({c.n_routed_experts}): experts are split into "
            "equal contiguous groups."
        ),
    ),
    (
        "topk_group",
        lambda c: c.topk_group <= c.n_group,
        lambda c: f"({c.topk_group}) cannot exceed `n_group` ({c.n_group}).",
    ),
    (
        "num_experts_per_tok",
        lambda c: c.num_experts_per_tok <= c.topk_group * _experts_per_group(c),
        lambda c: (
            f"({c.num_experts_per_tok}) is larger than the {c.topk_group * _experts_per_group(c)} experts left "
            f"in the `topk_group`={c.topk_group} kept groups ({_experts_per_group(c)} experts per group)."
        ),
    ),
    (
        "n_group",
        lambda c: c.n_group == 1 or _experts_per_group(c) >= 2,
        lambda c: (
            f"({c.n_group}) leaves fewer than 2 experts per group; the group score is the sum of each group's "
            "top-2 experts."
        ),
    ),
    (
        "first_k_dense_replace",
        lambda c: c.first_k_dense_replace <= c.num_hidden_layers,
        lambda c: f"({c.first_k_dense_replace}) is larger than `num_hidden_layers` ({c.num_hidden_layers}).",
    ),
)

# YaRN keys of ``rope_scaling``. rope.py treats a missing (or 0) beta / attention_factor as "use the default",
# and divides by ``0.1 * mscale_all_dim * ln(factor) + 1``, which a negative mscale_all_dim can make 0.
_YARN_RULES: tuple[tuple[str, Any, str], ...] = (
    ("factor", lambda v: _finite(v) and v >= 1, "must be a finite number >= 1 for YaRN, got {value!r}."),
    (
        "original_max_position_embeddings",
        lambda v: _int(v) and v > 0,
        "must be a positive integer for YaRN, got {value!r}.",
    ),
    *(
        (
            key,
            lambda v: v is None or (_finite(v) and v >= 0),
            "must be a finite number >= 0 (or absent), got {value!r}.",
        )
        for key in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow", "attention_factor")
    ),
)

#: No machine holds 2**50 (~1.1e15) parameters, ~1700x DeepSeek-V3: a config beyond it is a typo or a corrupt
#: file, and building the model first would spend minutes and all memory before failing.
MAX_PARAMETERS = 2**50


def estimated_parameters(c) -> int:
    """Parameters the config describes, to within the norms and biases (embeddings, MLA, dense and MoE MLPs)."""
    heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    q = c.hidden_size * heads * qk if c.q_lora_rank is None else c.q_lora_rank * (c.hidden_size + heads * qk)
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * heads * (
        c.qk_nope_head_dim + c.v_head_dim
    )
    attention = q + kv + heads * c.v_head_dim * c.hidden_size
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    moe_mlp = (
        3 * c.hidden_size * c.moe_intermediate_size * (c.n_routed_experts + c.n_shared_experts)
        + c.n_routed_experts * c.hidden_size
    )
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    freq, first = c.moe_layer_freq, min(c.first_k_dense_replace, layers)
    moe_layers = (layers + freq - 1) // freq - (first + freq - 1) // freq  # multiples of freq in [first, layers)
    return (
        2 * c.vocab_size * c.hidden_size + layers * attention + moe_layers * moe_mlp + (layers - moe_layers) * dense_mlp
    )


def _check_parameter_estimate(c) -> None:
    count = estimated_parameters(c)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"config describes about {count:.3g} parameters (num_hidden_layers={c.num_hidden_layers}, "
            f"n_routed_experts={c.n_routed_experts}, hidden_size={c.hidden_size}, "
            f"moe_intermediate_size={c.moe_intermediate_size}, vocab_size={c.vocab_size}), more than any machine "
            f"could build (at most {MAX_PARAMETERS:.3g}). The config.json is corrupt or mistyped: restore the "
            "model's own config.json."
        )


def _check_rope_dict_shape(name: str, value) -> None:
    """``rope_scaling`` / ``rope_parameters`` must be an object or null; transformers' rope code would otherwise
    fail with an AttributeError that names no field."""
    if value is not None and not isinstance(value, dict):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(
            f'config field `{name}` must be a JSON object such as {{"type": "yarn", "factor": 40, '
            f'"original_max_position_embeddings": 4096}}, or null for plain RoPE; got a {type(value).__name__}: '
            f"{shown}."
        )


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
        if not (_finite(factor) and factor >= 1):
            raise ValueError(
                f"config field `rope_scaling.factor` must be a finite number >= 1 for {kind!r}, got {factor!r}."
            )


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
