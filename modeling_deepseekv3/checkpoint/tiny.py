"""Tiny checkpoints in the exact official layout: for tests, examples, and users trying the tools."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.configuration import DeepseekV3PluginConfig
from ..fp8 import FP8_DTYPE, block_quantize
from .atomic import atomic_directory
from .headers import INDEX_NAME, SCALE_SUFFIX
from .layout import TensorSpec, checkpoint_layout, mtp_layer_indices
from .remote_code import SHIM_FILES, stamp_remote_code

__all__ = ["FP8_QUANTIZATION_CONFIG", "SERVABLE_DIMS", "TINY_CONFIG", "make_tiny_checkpoint"]

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
    if name.endswith("norm.weight"):  # also every *layernorm.weight
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


#: Overrides that make a tiny checkpoint servable by engines whose MLA kernels support only DeepSeek-V3's
#: latent width (vLLM's CPU MLA: ``kv_lora_rank + qk_rope_head_dim`` = 576, as in V3; the tiny default's 176
#: is refused with "Head dimension 176 is not supported by MLA"). ``make-tiny --servable``.
SERVABLE_DIMS = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}


def make_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    fp8: bool = True,
    mtp: bool = True,
    num_shards: int = 2,
    seed: int = 0,
    scale_fmt: str | None = None,
    overrides: dict | None = None,
    config: dict | None = None,
    tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a random model in the exact official layout (tiny unless ``config`` says otherwise); return its
    directory.

    Sharded safetensors named like the Hub's (``model-00001-of-000002.safetensors``) with
    ``model.safetensors.index.json``; FP8 weights (float8_e4m3fn + float32 ``weight_scale_inv``, 128x128
    blocks, power-of-two scales with ``scale_fmt="ue8m0"``) or BF16 weights; BF16 router weight, FP32
    router bias, per-expert keys, and (``mtp=True``) the MTP layer with its extras, its embedding and
    head copies of the main ones, all in the last shard as in the official files. ``config`` is the model's
    fields (a Hub ``config.json``'s dict, e.g. ``hub_config/moonlight/config.json``) in place of
    :data:`TINY_CONFIG`; ``overrides`` change fields of either. With ``tokenizer=True`` a small byte-level BPE
    with DeepSeek's special tokens and chat template is saved alongside (so ``pipeline()`` and chat work),
    plus a greedy ``generation_config.json``. The directory appears only when complete
    (:func:`~.atomic.atomic_directory`).

    Shards are written as soon as their last tensor exists, so memory holds about one shard, not the model: a
    real-size shape (Moonlight's 16 GB in FP8) is written on a box with less memory than that; ``progress``
    shows a bar over the bytes.

    ``path`` must not exist or be an empty directory. ``overwrite=True`` replaces a directory only when it holds
    a checkpoint of this function and nothing else (:func:`_check_replaceable`): the replaced directory is
    deleted whole, so a folder with anything else in it is refused, listing what is in the way.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    path = Path(path)
    _check_replaceable(path, overwrite)
    config_dict = dict(TINY_CONFIG if config is None else config)
    config_dict.update(overrides or {})
    if not mtp:
        config_dict["num_nextn_predict_layers"] = 0
    config_dict = _official_config_dict(config_dict, fp8, scale_fmt, torch.bfloat16)
    config = DeepseekV3PluginConfig.from_dict(config_dict)
    layout = checkpoint_layout(config)
    nbytes = {name: math.prod(spec.shape) * spec.dtype.itemsize for name, spec in layout.items()}
    shards = _assign_shards(list(layout), nbytes, num_shards, config)
    gen = torch.Generator().manual_seed(seed)

    with atomic_directory(path) as staging:
        writer = _ShardWriter(staging, shards, total=sum(nbytes.values()), progress=progress)
        sources: dict[str, torch.Tensor] = {}  # what MTP's embedding and head copy
        for name, spec in layout.items():
            if name.endswith(SCALE_SUFFIX):
                continue  # produced together with its weight
            mtp_copy = _mtp_copy_source(name, config)
            if mtp_copy is not None:
                writer.add(name, sources[mtp_copy].clone())
                continue
            # An untied MTP head is drawn and then replaced by the final lm_head's copy (below): drawing it
            # keeps the random stream, hence every tiny checkpoint's values, as they have always been.
            weight = _random_tensor(name, spec, gen)
            if name.endswith(".shared_head.head.weight"):
                continue
            if spec.dtype == FP8_DTYPE:
                q, s = block_quantize(weight, config.fp8_block_size, scale_fmt)
                writer.add(name, q)
                writer.add(name[: -len("weight")] + SCALE_SUFFIX, s)
            else:
                weight = weight.to(spec.dtype).contiguous()
                writer.add(name, weight)
                if name in ("model.embed_tokens.weight", "lm_head.weight") and config.num_nextn_predict_layers:
                    sources[name] = weight
        if "lm_head.weight" in sources:  # the MTP head copies of the final lm_head
            for i in mtp_layer_indices(config):
                writer.add(f"model.layers.{i}.shared_head.head.weight", sources["lm_head.weight"].clone())
        writer.close()

        (staging / INDEX_NAME).write_text(
            json.dumps(
                {
                    "metadata": {"total_size": sum(nbytes.values())},
                    "weight_map": dict(sorted(writer.weight_map.items())),
                },
                indent=2,
            )
        )
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        stamp_remote_code(staging)  # auto_map + shims: trust_remote_code tools reach this package
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}
        if tokenizer and config.vocab_size >= 300:
            from ..integrations.tokenizer import build_tiny_tokenizer

            tok = build_tiny_tokenizer(config.vocab_size)
            tok.save_pretrained(staging)
            generation["pad_token_id"] = tok.pad_token_id
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _check_replaceable(path, overwrite)  # again: the folder may have changed while the weights were written
    return path


class _ShardWriter:
    """Collects tensors per shard and saves a shard the moment its last tensor arrives, then drops it."""

    def __init__(self, staging: Path, shards: dict[str, list[str]], total: int, progress: bool):
        from tqdm.auto import tqdm

        self.staging = staging
        self.missing = {file: set(names) for file, names in shards.items()}
        self.shard_of = {name: file for file, names in shards.items() for name in names}
        self.buffers: dict[str, dict[str, torch.Tensor]] = {file: {} for file in shards}
        self.weight_map: dict[str, str] = {}
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        file = self.shard_of[name]
        self.buffers[file][name] = tensor
        self.missing[file].discard(name)
        self.weight_map[name] = file
        self.bar.update(tensor.numel() * tensor.element_size())
        if not self.missing[file]:
            save_file(self.buffers.pop(file), str(self.staging / file), metadata={"format": "pt"})

    def close(self) -> None:
        self.bar.close()
        unwritten = sorted(name for names in self.missing.values() for name in names)
        if unwritten:  # a layout/writer disagreement: never publish a checkpoint missing tensors
            raise RuntimeError(f"make_tiny_checkpoint produced no tensor for {_listing(unwritten)}.")


#: What :func:`make_tiny_checkpoint` writes, besides its shards: a folder holding nothing else is its output.
_WRITTEN_FILES = frozenset(
    {
        INDEX_NAME,
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        *SHIM_FILES,
    }
)
_SHARD_FILE = re.compile(r"model-\d+-of-\d+\.safetensors")


def _written_here(entry: Path) -> bool:
    """A plain file (not a link, not a folder) under a name this module writes."""
    return (
        entry.is_file()
        and not entry.is_symlink()
        and (entry.name in _WRITTEN_FILES or _SHARD_FILE.fullmatch(entry.name) is not None)
    )


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or (``overwrite``) a tiny checkpoint written here.

    Publishing (:func:`~.atomic.publish_directory`) deletes the old directory whole, so "replaced" must never
    reach a user's folder that merely has the same name: without ``overwrite`` a non-empty folder is refused;
    with it, a folder is replaced only when it holds config.json (of a DeepSeek-V3 model), weight shards named
    as this module names them, and no other file or folder."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(
            f"{path} exists and is not a directory; make-tiny writes a directory there. Choose another path."
        )
    names = sorted(os.listdir(path))
    if not names:
        return
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists and is not empty ({_listing(names)}). Pass overwrite=True (make-tiny "
            "--overwrite) to replace a tiny checkpoint written there before, or choose a new directory."
        )
    foreign = [name + ("/" if (path / name).is_dir() else "") for name in names if not _written_here(path / name)]
    if foreign:
        problem = f"these are not files make-tiny writes: {_listing(foreign)}"
    elif "config.json" not in names or not any(_SHARD_FILE.fullmatch(name) for name in names):
        problem = "it lacks config.json or model-*-of-*.safetensors shards, so it is not a checkpoint make-tiny wrote"
    elif _model_type(path / "config.json") not in ("deepseek_v3", "kimi_k2"):
        problem = "its config.json is not a DeepSeek-V3 config, so it is not a checkpoint make-tiny wrote"
    else:
        return
    raise FileExistsError(
        f"{path} is not replaced although overwrite was asked for: {problem}. Replacing deletes the whole folder, "
        "so it is done only for a folder holding nothing but a tiny checkpoint; move those files away or choose a "
        "new directory."
    )


def _model_type(config_path: Path):
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _mtp_copy_source(name: str, config) -> str | None:
    """MTP's embedding is a copy of the main embedding (the head copy is filled in afterwards)."""
    if name.startswith("model.layers.") and name.endswith(".embed_tokens.weight"):
        return "model.embed_tokens.weight"
    if name.endswith(".shared_head.head.weight"):
        return "model.embed_tokens.weight" if config.tie_word_embeddings else None
    return None


def _assign_shards(order: list[str], nbytes: dict[str, int], num_shards: int, config) -> dict[str, list[str]]:
    """Contiguous, roughly equal-byte shards in layout order; MTP tensors go to the last shard."""
    mtp_prefixes = tuple(f"model.layers.{i}." for i in mtp_layer_indices(config))
    main = [n for n in order if not n.startswith(mtp_prefixes)]
    mtp = [n for n in order if n.startswith(mtp_prefixes)]
    names = [f"model-{i + 1:05d}-of-{num_shards:06d}.safetensors" for i in range(num_shards)]
    main_shards = num_shards - 1 if (mtp and num_shards > 1) else num_shards
    total = sum(nbytes[n] for n in main)
    target = total / main_shards
    out: dict[str, list[str]] = {name: [] for name in names}
    shard, acc = 0, 0
    for n in main:
        if acc >= target * (shard + 1) and shard < main_shards - 1:
            shard += 1
        out[names[shard]].append(n)
        acc += nbytes[n]
    out[names[-1]].extend(mtp)
    return {k: v for k, v in out.items() if v}
