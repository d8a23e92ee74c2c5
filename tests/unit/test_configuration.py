"""Config: official files parse to the right numbers, round-trip in the official format, bad ones raise."""

from __future__ import annotations

import json

import pytest
import transformers

import modeling_deepseekv3 as ds
from helpers import ROOT
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.core.rope import softmax_scale

HUB = ROOT / "hub_config"


def official(name: str) -> dict:
    return json.loads((HUB / name / "config.json").read_text())


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "deepseek-v3-0324"])
def test_deepseek_v3_family_configs(name):
    cfg = ds.DeepseekV3Config.from_dict(official(name))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_nextn_predict_layers) == (
        129280,
        7168,
        61,
        1,
    )
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (256, 8, 4, 8)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim) == (1536, 512, 128, 64)
    assert cfg.qk_head_dim == 192 and cfg.head_dim == 64
    assert cfg.is_fp8 and cfg.fp8_block_size == (128, 128) and cfg.fp8_scale_fmt is None
    assert cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid" and cfg.routed_scaling_factor == 2.5
    assert cfg.first_k_dense_replace == 3 and not cfg.is_moe_layer(2) and cfg.is_moe_layer(3) and cfg.is_moe_layer(61)
    yarn = cfg.yarn_parameters
    assert yarn["factor"] == 40 and yarn["original_max_position_embeddings"] == 4096
    assert yarn["beta_fast"] == 32 and yarn["beta_slow"] == 1 and cfg.rope_theta == 10000
    assert softmax_scale(cfg) == pytest.approx(0.1352338, abs=1e-7)
    # transformers must not see the FP8 quantization_config (its quantizer would dequantize / swap modules)
    assert getattr(cfg, "quantization_config", None) is None
    assert str(cfg.dtype) == "torch.bfloat16"


def test_v31_ue8m0_scales():
    cfg = ds.DeepseekV3Config.from_dict(official("deepseek-v3.1"))
    assert cfg.fp8_scale_fmt == "ue8m0" and cfg.fp8_block_size == (128, 128)


def test_kimi_k2_config():
    raw = official("kimi-k2")
    cfg = ds.DeepseekV3Config.from_dict(raw)
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_attention_heads) == (384, 1, 1, 64)
    assert cfg.first_k_dense_replace == 1 and cfg.num_nextn_predict_layers == 0 and cfg.num_mtp_modules == 0
    assert cfg.routed_scaling_factor == pytest.approx(2.827) and cfg.vocab_size == 163840
    assert cfg.rope_theta == 50000 and cfg.yarn_parameters["factor"] == 32
    assert cfg.yarn_parameters["beta_fast"] == 1 and cfg.yarn_parameters["beta_slow"] == 1
    assert cfg.is_fp8
    out = cfg.to_dict()
    assert out["model_type"] == "kimi_k2"  # kept, not rewritten to deepseek_v3


def test_moonlight_config():
    cfg = ds.DeepseekV3Config.from_dict(official("moonlight"))
    assert cfg.q_lora_rank is None and cfg.kv_lora_rank == 512 and not cfg.is_fp8
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (2048, 27, 64, 6)
    assert cfg.n_shared_experts == 2 and cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 50000
    assert cfg.yarn_parameters is None and softmax_scale(cfg) == pytest.approx(192**-0.5)


def test_to_dict_is_the_official_format():
    raw = official("deepseek-v3")
    cfg = ds.DeepseekV3Config.from_dict(raw)
    out = cfg.to_dict()
    assert out["quantization_config"] == raw["quantization_config"]
    assert out["rope_scaling"] == raw["rope_scaling"] and out["rope_theta"] == raw["rope_theta"]
    assert "rope_parameters" not in out and "head_dim" not in out and "qk_head_dim" not in out
    assert "fp8_quantization_config" not in out
    for key, value in raw.items():
        if key not in ("transformers_version", "torch_dtype", "auto_map"):
            assert out[key] == value, key
    again = ds.DeepseekV3Config.from_dict(out)
    assert again.to_dict() == out


def test_save_and_reload_with_knobs(tmp_path):
    cfg = ds.DeepseekV3Config.from_dict(official("deepseek-v3"))
    cfg.load_mtp = False
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "fp8" and saved["load_mtp"] is False
    back = ds.DeepseekV3Config.from_pretrained(tmp_path)
    assert back.is_fp8 and back.load_mtp is False and back.num_mtp_modules == 0
    # transformers-native reads the same file to the same rope parameters
    native = transformers.DeepseekV3Config.from_pretrained(tmp_path)
    for key in ("factor", "beta_fast", "beta_slow", "mscale_all_dim", "original_max_position_embeddings"):
        assert native.rope_parameters[key] == back.rope_parameters[key]


def test_knob_through_from_pretrained_kwargs(tmp_path):
    ds.DeepseekV3Config.from_dict(official("deepseek-v3")).save_pretrained(tmp_path)
    cfg = ds.DeepseekV3Config.from_pretrained(tmp_path, dequantize_fp8=True)
    assert cfg.dequantize_fp8 is True


def test_class_name_does_not_collide_with_native():
    """Auto mappings compare config classes by __name__: ours must not be routed to the native model."""
    assert ds.DeepseekV3Config.__name__ != transformers.DeepseekV3Config.__name__
    cfg = ds.DeepseekV3Config(**TINY_CONFIG)
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_config(cfg)


BAD = [
    ({"n_group": 3}, "n_group"),  # 16 experts not divisible by 3
    ({"topk_group": 5}, "topk_group"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # 2 kept groups x 4 experts = 8
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"hidden_act": "swishy"}, "hidden_act"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"hidden_size": -8}, "hidden_size"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
    ({"n_routed_experts": 4, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2}, "n_group"),  # 1 expert/group
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 128}}, "rope_scaling.factor"),
    (
        {"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 0}},
        "original_max_position_embeddings",
    ),
    (
        {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}},
        "quantization_config.fmt",
    ),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
    (
        {
            "quantization_config": {
                "quant_method": "fp8",
                "weight_block_size": [128, 128],
                "activation_scheme": "static",
            }
        },
        "activation_scheme",
    ),
    (
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "e8m0"}},
        "scale_fmt",
    ),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f for _, f in BAD])
def test_inconsistent_config_raises_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ds.DeepseekV3Config(**{**TINY_CONFIG, **change})


def test_bad_config_json_fails_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "deepseek_v3", "topk_group": 7}))
    with pytest.raises(ValueError, match="topk_group"):
        ds.DeepseekV3Config.from_pretrained(tmp_path)


# Every float the config holds: its own fields (found from the class annotations, so a new float field is covered
# the day it is added) and the rope parameters. NaN or infinity in any of them ran and gave NaN logits.
FLOAT_FIELDS = sorted(name for name, kind in ds.DeepseekV3Config.__annotations__.items() if "float" in str(kind))
YARN_FLOATS = ["factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow", "attention_factor"]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def test_float_fields_are_the_expected_ones():
    assert {
        "routed_scaling_factor",
        "rms_norm_eps",
        "attention_dropout",
        "aux_loss_alpha",
        "initializer_range",
        "balance_loss_alpha",
        "routing_bias_update_rate",
        "mtp_loss_weight",
    } <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_float_field_is_refused(field, value):
    with pytest.raises(ValueError, match=f"config field `{field}`"):
        ds.DeepseekV3Config(**{**TINY_CONFIG, field: value})


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", YARN_FLOATS)
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_non_finite_yarn_parameter_is_refused(spelling, key, value):
    rope = {**TINY_CONFIG["rope_scaling"], key: value}
    base = {k: v for k, v in TINY_CONFIG.items() if k != "rope_scaling"}
    if spelling == "rope_parameters":  # transformers v5's name: the type key is rope_type, theta inside
        rope = {**rope, "rope_type": rope.pop("type"), "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=rf"config field `rope_scaling\.{key}`"):
        ds.DeepseekV3Config(**base, **{spelling: rope})


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_rope_theta_and_linear_factor_are_refused(value):
    with pytest.raises(ValueError, match="config field `rope_theta`"):
        ds.DeepseekV3Config(**{**TINY_CONFIG, "rope_theta": value})
    with pytest.raises(ValueError, match=r"config field `rope_scaling\.factor`"):
        ds.DeepseekV3Config(**{**TINY_CONFIG, "rope_scaling": {"type": "linear", "factor": value}})


@pytest.mark.parametrize(
    "change,field",
    [
        ({"routed_scaling_factor": -2.5}, "routed_scaling_factor"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"balance_loss_alpha": -1e-4}, "balance_loss_alpha"),
        ({"mtp_loss_weight": -0.1}, "mtp_loss_weight"),
        ({"routing_bias_update_rate": True}, "routing_bias_update_rate"),  # a bool is not a rate
        ({"rope_scaling": {**TINY_CONFIG["rope_scaling"], "mscale_all_dim": -1.0}}, r"rope_scaling\.mscale_all_dim"),
        ({"rope_scaling": {**TINY_CONFIG["rope_scaling"], "beta_fast": "32"}}, r"rope_scaling\.beta_fast"),
    ],
)
def test_float_out_of_range_is_refused(change, field):
    with pytest.raises(ValueError, match=field):
        ds.DeepseekV3Config(**{**TINY_CONFIG, **change})


def test_absent_optional_yarn_keys_are_fine():
    rope = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128}
    cfg = ds.DeepseekV3Config(**{**TINY_CONFIG, "rope_scaling": rope})
    assert cfg.yarn_parameters["factor"] == 4


@pytest.mark.parametrize("value", ["yarn", ["yarn", 40], 40, ""], ids=["string", "list", "number", "empty-string"])
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_of_the_wrong_type_names_the_field(spelling, value):
    with pytest.raises(
        ValueError, match=rf"config field `{spelling}` must be a JSON object.*got a {type(value).__name__}"
    ):
        ds.DeepseekV3Config(**{**TINY_CONFIG, spelling: value})


def test_config_json_with_nan_is_refused_from_the_file(tmp_path):
    raw = {
        **TINY_CONFIG,
        "model_type": "deepseek_v3",
        "rope_scaling": {**TINY_CONFIG["rope_scaling"], "mscale": float("nan")},
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))  # json writes the NaN literal, and reads it back
    with pytest.raises(ValueError, match=r"rope_scaling\.mscale.*nan"):
        ds.DeepseekV3Config.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change", [{"num_hidden_layers": 10**7}, {"n_routed_experts": 2**20, "n_group": 1, "topk_group": 1}]
)
def test_config_beyond_any_machine_is_refused(change):
    """With DeepSeek-V3's widths, ten million layers or a million experts per layer is past 2**50 parameters."""
    with pytest.raises(ValueError, match="more than any machine could build"):
        ds.DeepseekV3Config(**change)


def test_published_sizes_are_far_below_the_bound():
    from modeling_deepseekv3.core.configuration import MAX_PARAMETERS, estimated_parameters

    for name in ("deepseek-v3", "kimi-k2", "moonlight"):
        count = estimated_parameters(ds.DeepseekV3Config.from_dict(official(name)))
        assert 1e10 < count < MAX_PARAMETERS / 100
    assert estimated_parameters(ds.DeepseekV3Config.from_dict(official("deepseek-v3"))) == pytest.approx(
        671e9, rel=0.03
    )
