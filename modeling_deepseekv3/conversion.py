"""The official checkpoint layout as one declarative table, and the tools built on it.

``checkpoint_layout(config)`` lists every tensor of an official-layout checkpoint (name, shape, dtype),
derived from the config with the rules of ``spec/deepseek_v3.md`` §3.2. Everything that needs to know
"which tensors exist and which are FP8" reads this one table:

* :func:`make_tiny_checkpoint` writes a random tiny model in exactly that layout (tests, examples, users);
* :func:`convert_checkpoint` (``deepseek-v3 convert``) turns FP8 into BF16 and back, shard by shard;
* the contract test checks that our model's ``state_dict`` has the same names and shapes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from .configuration import DeepseekV3PluginConfig
from .fp8 import FP8_DTYPE, block_dequantize, block_quantize, scale_shape
from .loading import INDEX_NAME, SCALE_SUFFIX, SINGLE_NAME, CheckpointError, inspect_checkpoint_dir, read_safetensors_header

logger = logging.get_logger(__name__)

__all__ = [
    "TensorSpec",
    "checkpoint_layout",
    "TINY_CONFIG",
    "make_tiny_checkpoint",
    "convert_checkpoint",
]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def checkpoint_layout(config: DeepseekV3PluginConfig, dense_dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for ``config``, in file order.

    FP8 (when ``config.is_fp8``): every linear inside a decoder block (attention, dense MLP, routed and
    shared experts, also in the MTP block), each with a float32 ``weight_scale_inv [ceil(out/bm),
    ceil(in/bn)]``. Dense (``dense_dtype``): embeddings, norms, router weight, ``lm_head``, MTP's
    ``eh_proj`` and ``shared_head``. Always float32: ``mlp.gate.e_score_correction_bias``.
    MTP layers (``num_nextn_predict_layers``) follow the main layers whatever ``load_mtp`` says."""
    c = config
    block = c.fp8_block_size
    f32 = torch.float32
    table: dict[str, TensorSpec] = {}

    def dense(name: str, *shape: int, dtype: torch.dtype = dense_dtype) -> None:
        table[name] = TensorSpec(tuple(shape), dtype)

    def linear(prefix: str, out_features: int, in_features: int, bias: bool = False) -> None:
        if block is None:
            dense(f"{prefix}.weight", out_features, in_features)
        else:
            table[f"{prefix}.weight"] = TensorSpec((out_features, in_features), FP8_DTYPE)
            table[f"{prefix}.{SCALE_SUFFIX}"] = TensorSpec(scale_shape((out_features, in_features), block), f32)
        if bias:
            dense(f"{prefix}.bias", out_features)

    def mlp(prefix: str, intermediate: int) -> None:
        linear(f"{prefix}.gate_proj", intermediate, c.hidden_size)
        linear(f"{prefix}.up_proj", intermediate, c.hidden_size)
        linear(f"{prefix}.down_proj", c.hidden_size, intermediate)

    heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    dense("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        if i >= c.num_hidden_layers:  # MTP extras (spec §3.2)
            dense(f"{p}.embed_tokens.weight", c.vocab_size, c.hidden_size)
            dense(f"{p}.enorm.weight", c.hidden_size)
            dense(f"{p}.hnorm.weight", c.hidden_size)
            dense(f"{p}.eh_proj.weight", c.hidden_size, 2 * c.hidden_size)
            dense(f"{p}.shared_head.norm.weight", c.hidden_size)
            dense(f"{p}.shared_head.head.weight", c.vocab_size, c.hidden_size)
        dense(f"{p}.input_layernorm.weight", c.hidden_size)
        a = f"{p}.self_attn"
        if c.q_lora_rank is None:
            linear(f"{a}.q_proj", heads * qk, c.hidden_size)
        else:
            linear(f"{a}.q_a_proj", c.q_lora_rank, c.hidden_size, bias=c.attention_bias)
            dense(f"{a}.q_a_layernorm.weight", c.q_lora_rank)
            linear(f"{a}.q_b_proj", heads * qk, c.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size, bias=c.attention_bias)
        dense(f"{a}.kv_a_layernorm.weight", c.kv_lora_rank)
        linear(f"{a}.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        linear(f"{a}.o_proj", c.hidden_size, heads * c.v_head_dim, bias=c.attention_bias)
        dense(f"{p}.post_attention_layernorm.weight", c.hidden_size)
        if c.is_moe_layer(i):
            dense(f"{p}.mlp.gate.weight", c.n_routed_experts, c.hidden_size)
            dense(f"{p}.mlp.gate.e_score_correction_bias", c.n_routed_experts, dtype=f32)
            for e in range(c.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", c.moe_intermediate_size)
            if c.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts)
        else:
            mlp(f"{p}.mlp", c.intermediate_size)
    dense("model.norm.weight", c.hidden_size)
    if not c.tie_word_embeddings:
        dense("lm_head.weight", c.vocab_size, c.hidden_size)
    return table


# --------------------------------------------------------------------------------------------------
# tiny checkpoints

#: A tiny config that reaches every branch: dense + MoE layers, an MTP layer, n_group > 1 with
#: topk_group < n_group, YaRN, and shapes that are not multiples of 128 (partial FP8 blocks in
#: q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, the expert projections).
TINY_CONFIG = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 160,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 4,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 128,
        "type": "yarn",
    },
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "use_cache": True,
}

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def _random_tensor(name: str, spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """Values with the character of trained weights: unit-RMS activations, norms near 1 (but not 1, so a
    skipped norm changes the output), routers separated enough that routing is not a coin toss, and
    correction biases of both signs (so masking dropped groups with -inf vs 0.0 matters)."""
    shape = spec.shape
    if name.endswith("e_score_correction_bias"):
        return (torch.rand(shape, generator=gen) - 0.5) * 0.6
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    if name.endswith("mlp.gate.weight"):
        return torch.randn(shape, generator=gen) * (3.0 / math.sqrt(shape[1]))
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def _official_config_dict(config_dict: dict, fp8: bool, scale_fmt: str | None, dense_dtype: torch.dtype) -> dict:
    import transformers

    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **config_dict}
    out.pop("quantization_config", None)
    if fp8:
        q = dict(FP8_QUANTIZATION_CONFIG)
        if scale_fmt:
            q["scale_fmt"] = scale_fmt
        out["quantization_config"] = q
    out["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    out["transformers_version"] = transformers.__version__
    return dict(sorted(out.items()))


def make_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    fp8: bool = True,
    mtp: bool = True,
    num_shards: int = 2,
    seed: int = 0,
    scale_fmt: str | None = None,
    overrides: dict | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a random tiny model in the exact official layout and return its directory.

    Sharded safetensors named like the Hub's (``model-00001-of-000002.safetensors``) with
    ``model.safetensors.index.json``; FP8 weights (float8_e4m3fn + float32 ``weight_scale_inv``, 128x128
    blocks, power-of-two scales with ``scale_fmt="ue8m0"``) or BF16 weights; BF16 router weight, FP32
    router bias, per-expert keys, and (``mtp=True``) the MTP layer with its extras, its embedding and
    head copies of the main ones, all in the last shard as in the official files. ``overrides`` change
    fields of :data:`TINY_CONFIG`. With ``tokenizer=True`` a small byte-level BPE with DeepSeek's special
    tokens and chat template is saved alongside (so ``pipeline()`` and chat work), plus a greedy
    ``generation_config.json``. The directory is written under a temporary name and renamed at the end.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    path = Path(path)
    config_dict = dict(TINY_CONFIG)
    config_dict.update(overrides or {})
    if not mtp:
        config_dict["num_nextn_predict_layers"] = 0
    config_dict = _official_config_dict(config_dict, fp8, scale_fmt, torch.bfloat16)
    config = DeepseekV3PluginConfig.from_dict(config_dict)
    layout = checkpoint_layout(config)
    gen = torch.Generator().manual_seed(seed)

    tensors: dict[str, torch.Tensor] = {}
    for name, spec in layout.items():
        if name.endswith(SCALE_SUFFIX):
            continue  # produced together with its weight
        mtp_copy = _mtp_copy_source(name, config)
        if mtp_copy is not None:
            tensors[name] = tensors[mtp_copy].clone()
            continue
        weight = _random_tensor(name, spec, gen)
        if spec.dtype == FP8_DTYPE:
            q, s = block_quantize(weight, config.fp8_block_size, scale_fmt)
            tensors[name] = q
            tensors[name[: -len("weight")] + SCALE_SUFFIX] = s
        else:
            tensors[name] = weight.to(spec.dtype).contiguous()
    if "lm_head.weight" in tensors:  # write the MTP head copy from the final lm_head
        for i in range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers):
            tensors[f"model.layers.{i}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()

    shards = _assign_shards(list(layout), tensors, num_shards, config)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        weight_map = {}
        for file, names in shards.items():
            save_file({n: tensors[n] for n in names}, str(staging / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (staging / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}
        if tokenizer and config.vocab_size >= 300:
            from .tokenizer import build_tiny_tokenizer

            tok = build_tiny_tokenizer(config.vocab_size)
            tok.save_pretrained(staging)
            generation["pad_token_id"] = tok.pad_token_id
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _mtp_copy_source(name: str, config) -> str | None:
    """MTP's embedding is a copy of the main embedding (the head copy is filled in afterwards)."""
    if name.startswith("model.layers.") and name.endswith(".embed_tokens.weight"):
        return "model.embed_tokens.weight"
    if name.endswith(".shared_head.head.weight"):
        return "model.embed_tokens.weight" if config.tie_word_embeddings else None
    return None


def _assign_shards(order: list[str], tensors: dict[str, torch.Tensor], num_shards: int, config) -> dict[str, list[str]]:
    """Contiguous, roughly equal-byte shards in layout order; MTP tensors go to the last shard."""
    mtp_prefixes = tuple(
        f"model.layers.{i}."
        for i in range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
    )
    main = [n for n in order if not n.startswith(mtp_prefixes)]
    mtp = [n for n in order if n.startswith(mtp_prefixes)]
    names = [f"model-{i + 1:05d}-of-{num_shards:06d}.safetensors" for i in range(num_shards)]
    main_shards = num_shards - 1 if (mtp and num_shards > 1) else num_shards
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in main)
    target = total / main_shards
    out: dict[str, list[str]] = {name: [] for name in names}
    shard, acc = 0, 0
    for n in main:
        if acc >= target * (shard + 1) and shard < main_shards - 1:
            shard += 1
        out[names[shard]].append(n)
        acc += tensors[n].numel() * tensors[n].element_size()
    out[names[-1]].extend(mtp)
    return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------------------------------
# convert


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; `convert` needs it to know the layout.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}).") from None


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    scale_fmt: str | None = None,
    block_size: tuple[int, int] = (128, 128),
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an official-layout checkpoint between FP8 and BF16, one shard at a time.

    ``to="bf16"``: every float8 weight is block-dequantized with its ``weight_scale_inv`` (found through
    the index, whichever shard holds it) and rounded to BF16, as DeepSeek's ``fp8_cast_bf16`` does; the
    scales and ``quantization_config`` are dropped. ``to="fp8"``: every tensor the official layout
    stores as FP8 is quantized to float8_e4m3fn with fresh ``block_size`` scales (``scale_fmt="ue8m0"``
    gives V3.1's power-of-two scales); the rest is copied unchanged.

    Memory is bounded by one shard (never the whole model). Work happens in ``<dst>.partial``: each
    finished shard is written to a temporary name and renamed, so re-running the same command after an
    interruption resumes with the next shard; ``<dst>`` appears (by rename) only when everything,
    index and config included, is written. ``device`` may be any torch device ("cuda" is fastest; no
    FP8-capable GPU is needed)."""
    if to not in ("bf16", "fp8"):
        raise ValueError(f"`to` must be 'bf16' or 'fp8', got {to!r}.")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"`scale_fmt` must be None or 'ue8m0', got {scale_fmt!r}.")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("convert writes a new checkpoint; `dst` must differ from `src`.")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it.")
    config_dict = _read_config(src)
    source_config = DeepseekV3PluginConfig.from_dict(dict(config_dict))
    if to == "bf16" and not source_config.is_fp8:
        raise ValueError(f"{src} is not an FP8 checkpoint (its config.json has no FP8 quantization_config).")
    if to == "fp8" and source_config.is_fp8:
        raise ValueError(f"{src} is already an FP8 checkpoint.")
    tensors = inspect_checkpoint_dir(src)
    if tensors is None:
        raise CheckpointError(f"{src}: no {INDEX_NAME} or {SINGLE_NAME} found.")
    weight_map = {key: Path(info.file).name for key, info in tensors.items()}

    new_config = dict(config_dict)
    if to == "bf16":
        new_config.pop("quantization_config", None)
    else:
        quant = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=list(block_size))
        if scale_fmt:
            quant["scale_fmt"] = scale_fmt
        new_config["quantization_config"] = quant
    new_config["torch_dtype"] = "bfloat16"
    new_config.pop("dtype", None)
    fp8_keys: set[str] = set()
    if to == "fp8":
        layout = checkpoint_layout(DeepseekV3PluginConfig.from_dict(dict(new_config)))
        fp8_keys = {k for k, spec in layout.items() if spec.dtype == FP8_DTYPE}
        unknown = sorted(set(weight_map) - set(layout))
        if unknown:
            logger.warning("convert: %d tensors are not in the official layout and are copied as they are (e.g. %s).", len(unknown), unknown[0])

    work = dst.parent / f"{dst.name}.partial"
    params = {"src": str(src.resolve()), "to": to, "scale_fmt": scale_fmt, "block_size": list(block_size)}
    params_file = work / ".convert-params.json"
    if work.exists():
        if not params_file.is_file() or json.loads(params_file.read_text()) != params:
            raise FileExistsError(
                f"{work} holds an unfinished conversion with other settings; delete it or rerun with the same ones."
            )
    else:
        work.mkdir(parents=True)
        params_file.write_text(json.dumps(params))

    handles: dict[str, object] = {}

    def handle(file: str):
        if file not in handles:
            handles[file] = safe_open(str(src / file), framework="pt", device="cpu")
        return handles[file]

    shard_files = sorted(set(weight_map.values()))
    new_map: dict[str, str] = {}
    total = 0
    from transformers.utils.logging import tqdm

    for file in tqdm(shard_files, desc=f"convert -> {to}", unit="shard", disable=not progress):
        out_path = work / file
        keys = [k for k, f in weight_map.items() if f == file]
        if out_path.is_file():  # finished in an earlier run (renamed only when complete)
            header = read_safetensors_header(out_path)
            new_map.update({k: file for k in header})
            total += sum(_nbytes(info) for info in header.values())
            continue
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key.endswith(SCALE_SUFFIX) and to == "bf16":
                continue
            tensor = handle(file).get_tensor(key)
            if to == "bf16" and tensor.dtype == FP8_DTYPE:
                scale_key = key[: -len("weight")] + SCALE_SUFFIX
                if scale_key not in weight_map:
                    raise CheckpointError(f"{src / file}: FP8 weight {key!r} has no {SCALE_SUFFIX!r} companion.")
                scale = handle(weight_map[scale_key]).get_tensor(scale_key)
                block = source_config.fp8_block_size
                out[key] = block_dequantize(tensor.to(device), scale.to(device), block, torch.bfloat16).cpu()
            elif key in fp8_keys:
                q, s = block_quantize(tensor.to(device), block_size, scale_fmt)
                out[key] = q.cpu()
                out[key[: -len("weight")] + SCALE_SUFFIX] = s.cpu()
            else:
                out[key] = tensor
        tmp = work / (file + ".tmp")
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_path)
        new_map.update({k: file for k in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    handles.clear()

    for item in src.iterdir():  # tokenizer, generation config, remote-code files, README, ...
        if item.name in weight_map.values() or item.name in (INDEX_NAME, "config.json") or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, work / item.name)
    if (src / INDEX_NAME).is_file():
        (work / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2)
        )
    (work / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    params_file.unlink()
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(work, dst)
    return dst


def _nbytes(info) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n * (info.torch_dtype.itemsize if info.torch_dtype is not None else 1)
