"""Official-layout I/O: save -> load round trips, convert, and every bad-input error a user can reach."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint import INDEX_NAME
from modeling_deepseekv3.cli import main as cli
from modeling_deepseekv3.fp8 import FP8_DTYPE, block_dequantize


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.element_size() == 1 else t.numpy().tobytes()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- save


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_byte_identical(tiny_fp8, tmp_path, dtype):
    model = load(tiny_fp8, dtype=dtype)
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="300KB")
    before, after = tensors_of(tiny_fp8), tensors_of(out)
    assert before.keys() == after.keys()
    for key in before:
        assert same_bytes(before[key], after[key]), key  # FP8, scales, BF16 router, FP32 bias: all as published
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(before) and len(set(index["weight_map"].values())) > 1
    cfg = json.loads((out / "config.json").read_text())
    original = json.loads((tiny_fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == original["quantization_config"]
    assert cfg["rope_scaling"] == original["rope_scaling"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    again = load(out, dtype=dtype)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert not list(tmp_path.glob(".*partial*"))  # staging cleaned up


def test_save_over_previous_save_removes_stale_shards(tiny_fp8, tmp_path):
    model = load(tiny_fp8)
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="200KB")
    many = sorted(p.name for p in out.glob("*.safetensors"))
    model.save_pretrained(out)  # single file now
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and len(many) > 1
    assert not (out / INDEX_NAME).exists()
    assert load(out).config.is_fp8


def test_interrupted_save_leaves_nothing_that_looks_complete(tiny_fp8, tmp_path, monkeypatch):
    model = load(tiny_fp8)
    out = tmp_path / "saved"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ds.DeepseekV3ForCausalLM, "_save_pretrained_transformers", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(out)
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".*partial*"))


def test_native_loads_our_bf16_output(tiny_fp8, tmp_path):
    ours = load(tiny_fp8, dequantize_fp8=True, dtype=torch.bfloat16)
    ours.save_pretrained(tmp_path / "bf16")
    saved = tensors_of(tmp_path / "bf16")
    assert not any(k.endswith("weight_scale_inv") for k in saved)
    assert saved["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    native = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    ours32 = load(tmp_path / "bf16")
    ids = input_ids()
    with torch.no_grad():
        assert (native(ids).logits - ours32(ids).logits).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------- convert


def test_convert_fp8_bf16_fp8_keeps_fp8_bytes(tiny_fp8, tmp_path):
    bf16 = ds.convert_checkpoint(tiny_fp8, tmp_path / "bf16", to="bf16", progress=False)
    back = ds.convert_checkpoint(bf16, tmp_path / "fp8", to="fp8", progress=False)
    a, b, mid = tensors_of(tiny_fp8), tensors_of(back), tensors_of(bf16)
    assert a.keys() == b.keys() and not any(k.endswith("scale_inv") for k in mid)
    for key in a:
        if a[key].dtype == FP8_DTYPE:
            assert same_bytes(a[key], b[key]), key
            # FP8 -> BF16 is block dequantization rounded to BF16
            scale = a[key[: -len("weight")] + "weight_scale_inv"]
            assert torch.equal(mid[key], block_dequantize(a[key], scale, dtype=torch.bfloat16))
        elif key.endswith("weight_scale_inv"):
            # the BF16 step rounds each block's max, so scales agree to BF16 precision (2^-8 relative)
            torch.testing.assert_close(b[key], a[key], rtol=2**-8, atol=0)
        else:
            assert same_bytes(a[key], b[key]), key
    assert json.loads((back / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    assert ds.DeepseekV3ForCausalLM.from_pretrained(back).config.is_fp8


def test_convert_ue8m0_round_trip_is_exact(tmp_path):
    """Power-of-two scales make FP8 -> BF16 exact, so the round trip returns the same weights. (A block
    whose max rounded down to a power of two comes back with half the scale and doubled codes: equal
    values, different bytes.)"""
    src = ds.make_tiny_checkpoint(tmp_path / "v31", scale_fmt="ue8m0", mtp=False)
    bf16 = ds.convert_checkpoint(src, tmp_path / "bf16", to="bf16", progress=False)
    back = ds.convert_checkpoint(bf16, tmp_path / "fp8", to="fp8", scale_fmt="ue8m0", progress=False)
    a, b = tensors_of(src), tensors_of(back)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype == FP8_DTYPE:
            scale = key[: -len("weight")] + "weight_scale_inv"
            assert torch.equal(block_dequantize(a[key], a[scale]), block_dequantize(b[key], b[scale])), key
        elif not key.endswith("weight_scale_inv"):
            assert same_bytes(a[key], b[key]), key
    assert json.loads((back / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_convert_bf16_to_fp8_error_bound(tiny_bf16_direct_q, tmp_path):
    out = ds.convert_checkpoint(tiny_bf16_direct_q, tmp_path / "fp8", to="fp8", progress=False)
    dense, fp8 = tensors_of(tiny_bf16_direct_q), tensors_of(out)
    n_fp8 = 0
    for key, q in fp8.items():
        if q.dtype != FP8_DTYPE:
            continue
        n_fp8 += 1
        s = fp8[key[: -len("weight")] + "weight_scale_inv"]
        w = dense[key].float()
        s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        err = (w - block_dequantize(q, s)).abs()
        assert bool((err <= torch.maximum(w.abs() / 16, s_full / 1024) * (1 + 1e-6)).all()), key
    assert n_fp8 > 50
    assert fp8["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert fp8["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    model = load(out)
    with torch.no_grad():
        ids = input_ids()
        ref = load(tiny_bf16_direct_q)(ids).logits
        cosine = torch.nn.functional.cosine_similarity(model(ids).logits.flatten(), ref.flatten(), dim=0)
    assert cosine > 0.95  # FP8 rounding (and a few flipped routes) only; scrambled scales would give ~0


def test_convert_is_resumable_and_atomic(tiny_fp8, tmp_path, monkeypatch):
    import modeling_deepseekv3.checkpoint.convert as conversion

    dst = tmp_path / "bf16"
    real_save, calls = conversion.save_file, []

    def flaky_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(conversion, "save_file", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        ds.convert_checkpoint(tiny_fp8, dst, to="bf16", progress=False)
    assert not dst.exists()  # nothing that looks complete
    partial = tmp_path / "bf16.partial"
    assert len(list(partial.glob("*.safetensors"))) == 1 and not (partial / INDEX_NAME).exists()
    monkeypatch.setattr(conversion, "save_file", real_save)
    calls.clear()
    with pytest.raises(FileExistsError, match="settings differ"):
        ds.convert_checkpoint(tiny_fp8, dst, to="bf16", scale_fmt="ue8m0", progress=False)
    ds.convert_checkpoint(tiny_fp8, dst, to="bf16", progress=False)
    assert not partial.exists() and (dst / INDEX_NAME).exists()
    fresh = ds.convert_checkpoint(tiny_fp8, tmp_path / "fresh", to="bf16", progress=False)
    a, b = tensors_of(dst), tensors_of(fresh)
    assert all(same_bytes(a[k], b[k]) for k in a) and a.keys() == b.keys()
    with pytest.raises(FileExistsError):
        ds.convert_checkpoint(tiny_fp8, dst, to="bf16", progress=False)


def test_convert_refuses_wrong_direction(tiny_fp8, tiny_bf16_direct_q, tmp_path):
    with pytest.raises(ValueError, match="already an FP8"):
        ds.convert_checkpoint(tiny_fp8, tmp_path / "x", to="fp8")
    with pytest.raises(ValueError, match="not an FP8"):
        ds.convert_checkpoint(tiny_bf16_direct_q, tmp_path / "y", to="bf16")


def test_cli_convert_and_make_tiny(tmp_path, capsys):
    assert cli(["make-tiny", str(tmp_path / "t"), "--shards", "2", "--no-mtp"]) == 0
    assert len(list((tmp_path / "t").glob("*.safetensors"))) == 2
    assert cli(["convert", str(tmp_path / "t"), str(tmp_path / "b"), "--to", "bf16", "--quiet"]) == 0
    assert cli(["convert", str(tmp_path / "t"), str(tmp_path / "b"), "--to", "bf16", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    for sub in ([], ["convert"], ["make-tiny"]):
        with pytest.raises(SystemExit) as exc:
            cli([*sub, "--help"])
        assert exc.value.code == 0


def test_make_tiny_servable_has_v3_latent_width(tmp_path):
    """``--servable``: the latent width serving engines' MLA kernels need (576 = 512 + 64, as V3); it loads
    and decodes here like any tiny checkpoint."""
    assert cli(["make-tiny", str(tmp_path / "s"), "--servable", "--bf16"]) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
    model = load(tmp_path / "s")
    assert model.generate(input_ids(1, 4), max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_make_tiny_layout(tiny_fp8):
    index = json.loads((tiny_fp8 / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-000003.safetensors" for i in (1, 2, 3)]
    assert all(index["weight_map"][k] == files[-1] for k in index["weight_map"] if k.startswith("model.layers.3."))
    t = tensors_of(tiny_fp8)
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].shape == (176, 256)  # 1.375 blocks
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert (t["model.layers.1.mlp.gate.e_score_correction_bias"] < 0).any()
    assert t["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(t["model.layers.3.shared_head.head.weight"], t["lm_head.weight"])
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())


def moonlight_like(tmp_path: Path) -> dict:
    """Moonlight's hub config with its sizes shrunk: its own fields (no q_lora, no rope scaling, vocab and
    routing of its own), not the tiny config's."""
    config = json.loads((Path(__file__).parents[2] / "hub_config" / "moonlight" / "config.json").read_text())
    config.update(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2, vocab_size=640,
        n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=2,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return config


def test_make_tiny_from_a_hub_config_streams_shards(tmp_path, monkeypatch):
    """``config=``: the shape comes from a Hub config.json, not the tiny config; shards are saved as they fill, so
    when a shard is saved no tensor of another shard is held (a 16 GB model is written in a few GB)."""
    import modeling_deepseekv3.checkpoint.tiny as tiny

    held = []
    real_save = tiny.save_file

    def recording_save(tensors, filename, metadata=None):
        writer = recording_save.writer
        held.append((Path(filename).name, sum(len(b) for b in writer.buffers.values()), len(tensors)))
        return real_save(tensors, filename, metadata=metadata)

    real_init = tiny._ShardWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        recording_save.writer = self

    monkeypatch.setattr(tiny, "save_file", recording_save)
    monkeypatch.setattr(tiny._ShardWriter, "__init__", init)
    path = ds.make_tiny_checkpoint(tmp_path / "m", config=moonlight_like(tmp_path), num_shards=4, tokenizer=False)
    assert [name for name, _, _ in held] == [f"model-0000{i}-of-000004.safetensors" for i in (1, 2, 3, 4)]
    assert all(others == 0 for _, others, _ in held)  # the saved shard was popped; nothing else was buffered
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["q_lora_rank"] is None and cfg.get("rope_scaling") is None and cfg["vocab_size"] == 640
    t = tensors_of(path)
    assert "model.layers.1.self_attn.q_proj.weight" in t and not any("q_a_proj" in k for k in t)
    assert sum(n for _, _, n in held) == len(t) == len(json.loads((path / INDEX_NAME).read_text())["weight_map"])
    model = load(path)
    assert model.generate(input_ids(1, 4, vocab=640), max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_cli_make_tiny_config(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(moonlight_like(tmp_path)))
    assert cli(["make-tiny", str(tmp_path / "m"), "--config", str(tmp_path / "c.json"), "--shards", "3"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["n_routed_experts"] == 8
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert cli(["make-tiny", str(tmp_path / "n"), "--config", str(tmp_path / "bad.json")]) == 2
    assert "--config" in capsys.readouterr().err and not (tmp_path / "n").exists()
    assert cli(["make-tiny", str(tmp_path / "n"), "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bad input


def edit_shard(path: Path, key: str, fn):
    """Rewrite the shard holding ``key`` with ``fn(tensors)`` applied (and the index kept in sync)."""
    index_path = path / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = path / index["weight_map"][key]
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    for k in tensors:
        index["weight_map"].setdefault(k, shard.name)
    index_path.write_text(json.dumps(index))


SCALE_KEY = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
WEIGHT_KEY = "model.layers.1.self_attn.kv_b_proj.weight"


def test_missing_shard_file(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    (path / "model-00002-of-000003.safetensors").unlink()
    with pytest.raises(ds.CheckpointError, match=r"model-00002-of-000003\.safetensors.*does not exist"):
        load(path)


def test_index_names_a_key_the_shard_lacks(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    index = json.loads((path / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.1.mlp.experts.99.up_proj.weight"] = "model-00001-of-000003.safetensors"
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ds.CheckpointError, match=r"experts\.99\.up_proj.*does not contain it"):
        load(path)


def test_fp8_weight_without_scale(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    edit_shard(path, SCALE_KEY, lambda t: t.pop(SCALE_KEY))
    with pytest.raises(ds.CheckpointError, match=r"kv_b_proj\.weight'.*no 'weight_scale_inv'"):
        load(path)


def test_scale_of_wrong_shape(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    edit_shard(path, SCALE_KEY, lambda t: t.__setitem__(SCALE_KEY, torch.ones(2, 1)))
    with pytest.raises(ds.CheckpointError, match=r"kv_b_proj\.weight_scale_inv.*shape \[2, 1\].*needs \[2, 2\]"):
        load(path)


def test_weight_of_wrong_shape(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    edit_shard(path, WEIGHT_KEY, lambda t: t.__setitem__(WEIGHT_KEY, t[WEIGHT_KEY][:128].contiguous()))
    with pytest.raises(ds.CheckpointError, match=r"kv_b_proj\.weight.*shape \[128, 160\].*needs \[256, 160\]"):
        load(path)


def test_weight_of_wrong_dtype(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    edit_shard(path, WEIGHT_KEY, lambda t: t.__setitem__(WEIGHT_KEY, t[WEIGHT_KEY].to(torch.bfloat16)))
    with pytest.raises(ds.CheckpointError, match=r"kv_b_proj\.weight' is BF16.*float8_e4m3fn weight is expected"):
        load(path)


def test_fp8_weights_without_quantization_config(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ds.CheckpointError, match="needs `quantization_config`"):
        load(path)


def test_bf16_scale_is_rejected(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    edit_shard(path, SCALE_KEY, lambda t: t.__setitem__(SCALE_KEY, t[SCALE_KEY].bfloat16()))
    with pytest.raises(ds.CheckpointError, match="must be F32"):
        load(path)


def test_missing_dense_tensor(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    key = "model.layers.2.post_attention_layernorm.weight"
    edit_shard(path, key, lambda t: t.pop(key))
    with pytest.raises(ds.CheckpointError, match=r"lacks 1 tensors.*post_attention_layernorm"):
        load(path)


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header", "empty"])
def test_truncated_or_corrupt_shard(tiny_fp8, tmp_path, damage):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    shard = path / "model-00002-of-000003.safetensors"
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) - 1000])
        pattern = "truncated"
    elif damage == "corrupt_header":
        shard.write_bytes(data[:8] + b"\xff" * 20 + data[28:])
        pattern = "corrupt safetensors header"
    else:
        shard.write_bytes(b"")
        pattern = "not a safetensors file"
    with pytest.raises(ds.CheckpointError, match=rf"model-00002-of-000003\.safetensors.*{pattern}"):
        load(path)


def test_errors_also_reach_the_convert_tool(tiny_fp8, tmp_path):
    path = copy_ckpt(tiny_fp8, tmp_path / "c")
    (path / "model-00003-of-000003.safetensors").unlink()
    with pytest.raises(ds.CheckpointError, match="does not exist"):
        ds.convert_checkpoint(path, tmp_path / "out", to="bf16")
    assert not (tmp_path / "out").exists()
