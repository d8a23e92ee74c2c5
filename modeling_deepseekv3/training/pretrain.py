"""``deepseek-v3 pretrain``: train a DeepSeek-V3-architecture model from scratch the DeepSeek way.

What is DeepSeek-specific here, and nothing else (data, tokenizer, checkpoints and plots come from the
ecosystem: HF ``tokenizers``, ``torch.distributed.checkpoint``, tqdm, matplotlib):

* the joint objective: next-token loss + ``mtp_weight`` x the multi-token-prediction loss (the MTP layer
  shares the embedding and output head with the main model, as in the paper) + the sequence-wise balance
  loss (``balance_alpha``);
* aux-loss-free load balancing: expert loads counted over all micro-batches of a step, then every router
  bias moved by ``bias_update_rate`` x sign(mean - load);
* AdamW (0.9, 0.95, weight decay 0.1), gradient clipping 1.0, linear warm-up then cosine decay to 10% of the
  peak learning rate (the paper's shape at small scale);
* exports in the official layout: BF16 and FP8 (128x128 blocks) with the MTP layer at
  ``model.layers.{num_hidden_layers}`` and its embedding/head copies, loadable by us and transformers-native.

Determinism: the same command and seed give the same losses; ``--resume`` continues bit for bit from the
last checkpoint (model, optimizer, data position, RNG, statistics) with the same layout, and within float
rounding with another one (checkpoints are DCP, resharded on load). Under ``torchrun`` with ``--dp N`` the
same loop runs data-parallel (``distributed/data_parallel.py``): each rank takes its slice of every global
batch; with ``--ep N`` expert-parallel (``distributed/expert_parallel.py``: the ranks split the batch and
the routed experts); with ``--pp N`` pipeline-parallel (``distributed/pipeline.py``), alone or with ``--ep``.
What a single process would log is what rank 0 logs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
from importlib.resources import files
from pathlib import Path

import torch

from ..checkpoint.remote_code import REMOTE_CODE_FILES
from ..core.configuration import DeepseekV3Config
from ..distributed.schedules import schedule_named
from ..fp8.training import convert_from_fp8_training, convert_to_fp8_training, fp8_training_recipe
from .args import PRESETS, PretrainArgs
from .balance import expert_load_counts, track_expert_load, update_routing_bias
from .data import (
    DataError,
    TokenStream,
    WindowSampler,
    bits_per_byte,
    describe,
    eval_windows,
    resolve_files,
    token_byte_lengths,
)
from .optim import AdamWBF16Moments

__all__ = ["PRESETS", "PretrainArgs", "PretrainError", "load_model_config", "pretrain"]


class PretrainError(RuntimeError):
    """The run cannot go on (non-finite loss, incompatible resume, ...); the message says why and what to do."""


def load_model_config(spec: str, vocab_size: int | None = None) -> DeepseekV3Config:
    """``--model-config``: a config.json path, a directory holding one, or a preset name (:data:`PRESETS`).

    A bare preset name that is also an existing path is refused: a local ``./tiny`` folder must not silently
    replace the ``tiny`` preset (or the other way round)."""
    path = Path(spec)
    if spec in PRESETS and path.exists():
        raise PretrainError(
            f"--model-config {spec!r} is both the preset {spec!r} and the path {path.resolve()}; pass ./{spec} for "
            "the path, or rename/move it to use the preset."
        )
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PretrainError(f"{path}: not valid JSON ({exc}).") from None
    elif spec in PRESETS:
        raw = json.loads((files(__package__) / "presets" / f"{spec}.json").read_text())
    else:
        raise PretrainError(f"--model-config {spec!r}: no such file, and not a preset ({', '.join(PRESETS)}).")
    if not isinstance(raw, dict) or "hidden_size" not in raw:
        raise PretrainError(f"--model-config {spec!r}: expected a DeepSeek-V3 config.json object with hidden_size.")
    raw.pop("quantization_config", None)  # train dense; FP8 training is the --fp8 recipe, exports are converted
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    return DeepseekV3Config(**raw)


def lr_at(step: int, args: PretrainArgs) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x peak at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def tie_mtp_to_main(model) -> None:
    """The MTP layers share the embedding and the output head with the main model (paper §2.2): one set of
    parameters, trained by both losses. (Exports write both copies, as the official checkpoints do.)"""
    for layer in model.model.mtp_layers:
        layer.embed_tokens.weight = model.model.embed_tokens.weight
        layer.shared_head.head.weight = model.lm_head.weight


def _config_fingerprint(config) -> str:
    d = config.to_dict()
    for k in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _build_tokenizer(
    args: PretrainArgs, config: DeepseekV3Config, train_files: list[Path], out: Path, reuse_saved: bool | None = None
):
    """``--tokenizer``, else the run's own saved tokenizer -- only when continuing that run (``--resume``; or a
    rank reading what rank 0 just trained) -- else a BPE trained on the data. A fresh run never picks up an
    earlier run's tokenizer: its ``--vocab-size`` and data would be silently ignored."""
    from ..integrations.tokenizer import load_tokenizer, train_bpe_tokenizer

    saved = out / "tokenizer"
    if reuse_saved is None:
        reuse_saved = args.resume
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    elif reuse_saved and (saved / "tokenizer.json").is_file():  # trained by the run this one continues
        tok = load_tokenizer(saved)
    elif args.vocab_size:
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in train_files)
        tok = train_bpe_tokenizer(texts, args.vocab_size, model_max_length=config.max_position_embeddings)
        tmp = out / ".tokenizer.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        tmp.replace(saved)
    else:
        raise PretrainError("pass --tokenizer PATH or --vocab-size N (to train a byte-level BPE on the data).")
    if len(tok) > config.vocab_size:
        raise PretrainError(
            f"the tokenizer has {len(tok)} tokens but the model config has vocab_size {config.vocab_size}: "
            "pass --vocab-size to size both, or a config with a larger vocab_size."
        )
    return tok


def _log_step(line: str, default: int) -> int:
    """The step of one log line; ``default`` for a line that is not a record (a line cut short by a kill)."""
    try:
        record = json.loads(line)
    except ValueError:
        return default
    return record.get("step", default) if isinstance(record, dict) and isinstance(record.get("step"), int) else default


class _Logger:
    """One JSON object per step to ``--log-json`` (appended, so a resumed run continues the same file)."""

    def __init__(self, path: str | None, resume_step: int):
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and resume_step:  # drop entries past the checkpoint we resume from
                lines = self.path.read_text().splitlines()
                kept = [line for line in lines if _log_step(line, resume_step + 1) <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept))
            elif self.path.exists():
                self.path.unlink()

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _few(names) -> str:
    names = list(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _refuse_writing_into_inputs(args: PretrainArgs) -> None:
    """``--output`` and ``--log-json`` must not be, or contain, anything the run reads (its data, held-out text,
    model config, tokenizer), nor lie inside a folder given as one of those: a log written over the training text,
    or a model card written over a config, destroys the input before anyone notices. Resolved paths are compared,
    so symlinks and relative spellings do not get around it."""
    inputs: dict[Path, str] = {}
    for flag, specs in (("--data", args.data), ("--eval-data", args.eval_data)):
        for file in resolve_files(specs) if specs else []:
            inputs.setdefault(file, flag)
        for spec in specs:
            if Path(spec).exists():
                inputs.setdefault(Path(spec).resolve(), flag)
    config = Path(args.model_config)
    if args.model_config and config.exists():
        inputs.setdefault(config.resolve(), "--model-config")
        if config.is_dir() and (config / "config.json").exists():
            inputs.setdefault((config / "config.json").resolve(), "--model-config")
    if args.tokenizer and Path(args.tokenizer).exists():
        inputs.setdefault(Path(args.tokenizer).resolve(), "--tokenizer")
    out = Path(args.output).resolve()
    writers = {"--output": out}
    if args.log_json:
        writers["--log-json"] = Path(args.log_json).resolve()
    for flag, target in writers.items():
        for path, source in sorted(inputs.items()):
            if target == path or target in path.parents:
                how = "is" if target == path else "contains"
                raise PretrainError(
                    f"{flag} {target} {how} the {source} path {path}: the run would write over its own input. "
                    f"Choose another {flag}."
                )
    for flag, target in writers.items():
        for path, source in sorted(inputs.items()):
            if path.is_dir() and path in target.parents:
                raise PretrainError(
                    f"{flag} {target} lies inside the {source} folder {path}: what the run writes there would land "
                    f"among (or on) the files it reads. Choose a {flag} outside it."
                )
    log = writers.get("--log-json")
    if log is not None and (log == out or out in log.parents):
        first = log.relative_to(out).parts[0] if log != out else None
        if first is None or _own_kind(first) is not None:
            raise PretrainError(
                f"--log-json {log} is where the run writes its own {'--output folder' if first is None else first}; "
                "choose another --log-json."
            )
    if log is not None and log.exists() and not _log_is_ours(log):
        raise PretrainError(
            f"--log-json {log} exists and is not a log written by this command; the run would replace it. Move it "
            "or choose another --log-json."
        )


# what this command writes directly under --output: folders and files, and the staging leftovers of their writers
_TOKENIZER_FILE = (
    r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja"
    r"|vocab\.json|merges\.txt"
)
_INSIDE = {
    "tokenizer": re.compile(rf"^({_TOKENIZER_FILE})$"),
    "export": re.compile(
        rf"^({_TOKENIZER_FILE}|config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors(\.tmp)?"
        r"|model\.safetensors\.index\.json|\.convert-params\.json|\.convert\.lock"
        rf"|{'|'.join(map(re.escape, sorted(REMOTE_CODE_FILES)))})$"  # the trust_remote_code shims
    ),
    "checkpoints": re.compile(r"^\.?step-\d{7}(\.(partial|old)-\d+)?/(\.metadata|__\d+_\d+\.distcp|meta\.json)$"),
}
_OWN_NAMES = {
    "checkpoints": "checkpoints",
    "tokenizer": "tokenizer",
    ".tokenizer.partial": "tokenizer",
    "bf16": "export",
    "fp8": "export",
    "fp8.partial": "export",
    "README.md": "card",
    "summary.json": "summary",
    "loss_curve.png": "file",
}
_OWN_LEFTOVER = re.compile(r"^\.(bf16|fp8)\.(partial|old)-\d+$")


def _own_kind(name: str) -> str | None:
    """The kind of a top-level ``--output`` entry this command writes (None: not one of its names)."""
    return _OWN_NAMES.get(name) or ("export" if _OWN_LEFTOVER.match(name) else None)


def _log_is_ours(path: Path) -> bool:
    """A ``--log-json`` file this command wrote: empty, or its first record is a JSON object with a step."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace").lstrip().split("\n", 1)[0]
    return not head or _log_step(head, -1) >= 0


def _not_ours(path: Path, kind: str) -> list[str]:
    """What inside the ``--output`` entry ``path`` this command did not write (``path`` itself if it is of the
    wrong type or content); symlinks are never its own."""
    from .report import is_model_card

    if kind in ("card", "summary", "file", "log"):
        if path.is_symlink() or not path.is_file():
            return [path.name]
        if kind == "card" and not is_model_card(path):
            return [path.name]
        if kind == "summary" and not _is_summary(path):
            return [path.name]
        if kind == "log" and not _log_is_ours(path):
            return [path.name]
        return []
    if path.is_symlink() or not path.is_dir():
        return [path.name]
    pattern, found = _INSIDE[kind], []
    for root, dirs, filenames in os.walk(path):
        for name in [*filenames, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            rel = Path(root, name).relative_to(path).as_posix()
            if os.path.islink(os.path.join(root, name)) or not pattern.match(rel):
                found.append(f"{path.name}/{rel}")
    return sorted(found)


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "steps" in data and "tokens" in data


def _prepare_output(args: PretrainArgs, main: bool) -> Path:
    """Check ``--output`` before any work, then (``main`` only) make it ready.

    A new run starts in a new or empty folder. ``--overwrite`` lets it start in a used one: it replaces what this
    command writes there (checkpoints/, tokenizer/, bf16/, fp8/, README.md, loss_curve.png, summary.json, the log)
    and leaves everything else alone -- refusing if one of the folders it would replace holds a file it did not
    write (a whole-folder replace would delete it). ``--resume`` continues in the run's folder, with the same
    refusal for the exports and card it will rewrite. Every rank checks (read-only, the same answer on all);
    only ``main`` deletes."""
    out = Path(args.output)
    if args.resume and args.overwrite:
        raise PretrainError("--resume continues the run in --output and --overwrite starts it over: pass one of them.")
    if out.exists() and not out.is_dir():
        raise PretrainError(f"--output {out} exists and is not a folder.")
    names = sorted(os.listdir(out)) if out.is_dir() else []
    log = Path(args.log_json).resolve() if args.log_json else None
    own = {n: k for n in names if (k := _own_kind(n))}
    if log is not None and log.parent == out.resolve() and log.name in names:
        own[log.name] = "log"
    tainted = {n: bad for n, kind in own.items() if (bad := _not_ours(out / n, kind))}
    foreign = [n for n in names if n not in own]
    if args.resume:
        rewritten = {"summary.json"} | ({"bf16", "fp8", "README.md", "loss_curve.png"} if args.export else set())
        replaced = [n for n in own if n in rewritten]
    elif names and not args.overwrite:
        if foreign or tainted:
            others = foreign + [p for bad in tainted.values() for p in bad]
            raise PretrainError(
                f"--output {out} is not empty: it holds files this command did not write ({_few(others)}). Choose a "
                "new or empty folder, or pass --overwrite to write beside them (they are kept; only this command's "
                "own outputs are replaced)."
            )
        raise PretrainError(
            f"--output {out} holds an earlier run ({_few(names)}): pass --resume to continue it, or --overwrite to "
            "start over (its checkpoints, tokenizer, exports and card are replaced)."
        )
    else:
        replaced = list(own)
    bad = [p for n in replaced for p in tainted.get(n, [])]
    if bad:
        raise PretrainError(
            f"--output {out}: the run replaces its own {_few(sorted({p.split('/')[0] for p in bad}))} whole, but "
            f"they hold what this command did not write ({_few(bad)}); move that out first. Nothing was changed."
        )
    if main:
        if not args.resume:
            for name in replaced:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, byte_len: torch.Tensor, batch: int) -> dict:
    """Held-out next-token loss (nats/token) and bits per byte over ``windows`` (model in eval mode: the LM
    loss only)."""
    was_training = model.training
    model.eval()
    nll, tokens, nbytes = 0.0, 0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        inputs, targets = w[:, :-1].clamp(min=0), w[:, 1:]
        logits = model(inputs, use_cache=False).logits.float()
        valid = targets != -100
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        nll += float(losses[valid].sum())
        tokens += int(valid.sum())
        nbytes += int(byte_len[targets[valid]].sum())
    model.train(was_training)
    return {
        "eval_loss": nll / max(tokens, 1),
        "eval_bits_per_byte": bits_per_byte(nll, nbytes),
        "eval_tokens": tokens,
        "eval_bytes": nbytes,
    }


def pretrain(args: PretrainArgs) -> dict:
    """Run (or resume) a pretraining job; returns the final figures. Raises :class:`PretrainError` or
    :class:`~.data.DataError` with the reason before any damage."""
    from ..distributed.checkpoint import (
        TrainingCheckpointError,
        latest_checkpoint,
        load_training_state,
        read_meta,
        save_training_state,
    )
    from ..distributed.layout import check_same_on_every_rank, init_layout
    from ..distributed.parallelize import parallelize
    from ..modeling import DeepseekV3ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # before the process group: a schedule pretrain cannot run is refused on the spot
        schedule = schedule_named(args.pp_schedule, to_run=True) if (args.pp or 1) > 1 else None
    except ValueError as e:
        raise PretrainError(str(e)) from None
    layout = init_layout(args.dp, args.pp, args.ep)
    stages = schedule.num_stages(layout.pp) if schedule else 1
    micro = args.micro_batch_size or max(1, args.global_batch_size // (layout.data * stages))
    if micro < 1 or args.global_batch_size % (micro * layout.data):
        flag = f"--dp {layout.dp}"  # (the data-parallel ranks: also those of --ep)
        raise PretrainError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size {micro} x "
            f"{flag}: each optimizer step accumulates whole micro-batches on every rank."
        )
    if args.adam_moments not in ("fp32", "bf16"):
        raise PretrainError(f"--adam-moments must be fp32 or bf16, got {args.adam_moments!r}.")
    if args.steps < 1 or args.seq_len < 2:
        raise PretrainError("--steps must be >= 1 and --seq-len >= 2.")
    _refuse_writing_into_inputs(args)
    out = _prepare_output(args, main=layout.is_main)
    layout.barrier()
    ckpt_root = out / "checkpoints"

    config = load_model_config(args.model_config, args.vocab_size)
    config.mtp_loss_weight = args.mtp_weight
    config.balance_loss_alpha = args.balance_alpha
    config.routing_bias_update_rate = args.bias_update_rate
    config.use_cache = False
    train_files = resolve_files(args.data)
    eval_files = resolve_files(args.eval_data) if args.eval_data else []
    overlap = set(train_files) & set(eval_files)
    if overlap:
        raise DataError(f"{sorted(overlap)[0]} is in both --data and --eval-data; hold evaluation text out.")
    if layout.is_main:  # one rank trains (or reads) the tokenizer; the others read what it saved
        tok = _build_tokenizer(args, config, train_files, out)
    layout.barrier()
    if not layout.is_main:
        tok = _build_tokenizer(args, config, train_files, out, reuse_saved=True)
    stream = TokenStream.from_files(train_files, tok)
    sampler = WindowSampler(stream, args.seq_len, args.seed)
    eval_stream = TokenStream.from_files(eval_files, tok) if eval_files else None
    byte_len = token_byte_lengths(tok)

    layout_flags = {"dp": layout.dp, "pp": layout.pp, "ep": layout.ep, "pp_schedule": args.pp_schedule, "micro": micro}
    check_same_on_every_rank(
        layout,
        {
            "args": args.identity() | layout_flags,
            "config": _config_fingerprint(config),
            "data": stream.fingerprint,
            "eval_data": eval_stream.fingerprint if eval_stream else None,
        },
    )
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(config)
    tie_mtp_to_main(model)
    run = parallelize(
        model,
        layout,
        global_batch_size=args.global_batch_size,
        micro_batch_size=micro,
        fp8=args.fp8,
        pp_schedule=args.pp_schedule,
        pp_overlap=args.pp_overlap,
        seq_len=args.seq_len,
    )
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.adam_moments == "bf16":  # the report's §3.3.3: BF16 moments, fp32 master weights
        optimizer = AdamWBF16Moments(groups, lr=args.lr, betas=(0.9, 0.95))
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    track_expert_load(model, True, training_only=True)  # evaluation must not steer the bias update
    meta = {
        "args": args.identity(),
        "config": _config_fingerprint(config),
        "data": stream.fingerprint,
        "eval_data": eval_stream.fingerprint if eval_stream else None,
    }

    step, tokens_seen, history = 0, 0, []
    if args.resume:
        path = latest_checkpoint(ckpt_root)
        if path is None:
            raise PretrainError(f"--resume: no complete checkpoint under {ckpt_root}; run without --resume to start.")
        saved = read_meta(path)
        # a flag added after that run was written takes its default there
        saved["args"] = {**PretrainArgs(model_config="", data=[], output="").identity(), **saved.get("args", {})}
        for key in ("args", "config", "data", "eval_data"):
            if saved.get(key) != meta[key]:
                raise TrainingCheckpointError(
                    f"--resume: {path} was written by a run with a different {key} ({saved.get(key)} vs now "
                    f"{meta[key]}). Resume with the same command, or start a new --output."
                )
        loop = load_training_state(path, model, optimizer)
        step, tokens_seen = int(loop["step"]), int(loop["tokens"])
        sampler.load_state_dict(loop["sampler"])
        history = list(loop["history"])
    logger = _Logger(args.log_json if layout.is_main else None, step if args.resume else 0)

    def save(at_step: int) -> None:
        loop = {"step": at_step, "tokens": tokens_seen, "sampler": sampler.state_dict(), "history": history}
        save_training_state(ckpt_root, at_step, model, optimizer, loop, meta)

    eval_w = eval_windows(eval_stream, args.seq_len) if eval_stream else None
    from transformers.utils.logging import tqdm

    bar = tqdm(
        total=args.steps, initial=step, desc="pretrain", unit="step", disable=not (args.progress and layout.is_main)
    )
    t_last = time.perf_counter()
    while step < args.steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts = run.forward_backward(sampler.next_batch(args.global_batch_size))
        if not math.isfinite(parts["loss"]):
            last = latest_checkpoint(ckpt_root)
            raise PretrainError(
                f"step {step}: the loss is {parts['loss']} (not finite). Lower --lr (now {args.lr}) or raise "
                f"--warmup-steps; the last good checkpoint is {last or 'none (nothing saved yet)'} (--resume)."
            )
        grad_norm = run.clip_grad_norm_(args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layout.sum_(list(expert_load_counts(model).values()))  # every rank's bias update sees the global batch
        imbalance = layout.merge(update_routing_bias(model, args.bias_update_rate))
        step += 1
        tokens_seen += args.global_batch_size * args.seq_len
        now = time.perf_counter()
        record = {
            "step": step,
            **{k: round(v, 6) for k, v in parts.items()},
            "lr": lr,
            "tokens": tokens_seen,
            "tokens_per_s": round(args.global_batch_size * args.seq_len / max(now - t_last, 1e-9), 1),
            "grad_norm": round(grad_norm, 4),
            "expert_load_imbalance": round(sum(imbalance.values()) / len(imbalance), 4) if imbalance else None,
        }
        t_last = now
        if eval_w is not None and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            if run.pipeline is None:
                figures = evaluate(model, eval_w, byte_len, micro)
            else:  # gathered on rank 0 and evaluated there, the others wait for the figures
                plain = _gather_plain_model(run, config)
                figures = layout.broadcast(evaluate(plain, eval_w, byte_len, micro) if layout.is_main else None)
            record.update({k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()})
        history.append(
            {k: record[k] for k in ("step", "loss", "lm_loss", "mtp_loss") if k in record}
            | (
                {"eval_loss": record["eval_loss"], "eval_bits_per_byte": record["eval_bits_per_byte"]}
                if "eval_loss" in record
                else {}
            )
        )
        logger.write(record)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save(step)
    bar.close()
    save(step)
    summary = {
        "steps": step,
        "tokens": tokens_seen,
        "final": history[-1] if history else {},
        "train_data": describe(train_files),
        "eval_data": describe(eval_files) if eval_files else None,
        "data_parallel": layout.dp,
        "pipeline_parallel": layout.pp,
        "expert_parallel": layout.ep,
    }
    plain = _gather_plain_model(run, config) if args.export else None  # collective under --dp
    if layout.is_main:
        if args.export:
            summary["exports"] = export(plain, tok, out, config)
            from .report import write_loss_curve, write_model_card

            n_params = sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values())
            summary["loss_curve"] = write_loss_curve(
                history,
                out / "loss_curve.png",
                title=f"Pretraining a {n_params / 1e6:.1f}M-parameter DeepSeek-V3: {tokens_seen / 1e6:.1f}M tokens",
                held_out=", ".join(Path(f).name for f in eval_files) or None,
                mtp_weight=args.mtp_weight,
            )
            write_model_card(out, args, config, summary, plain)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    layout.barrier()
    return summary


def _gather_plain_model(run, config):
    """The trained model as one unsharded module on rank 0 (the model itself when alone; None elsewhere)."""
    model = run.model
    if not run.layout.distributed:
        return model
    from ..modeling import DeepseekV3ForCausalLM

    full = run.full_state_dict()  # collective
    if full is None:  # not rank 0
        return None
    plain = DeepseekV3ForCausalLM(config)
    tie_mtp_to_main(plain)
    if fp8_training_recipe(model) is not None:
        convert_to_fp8_training(plain, fp8_training_recipe(model))
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise PretrainError(f"gathering the trained model failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return plain  # (the router biases are persistent buffers: in the state dict, identical on every rank)


def export(model, tok, out: Path, config) -> dict:
    """The trained model in the official layout: ``out/bf16`` (save_pretrained) and ``out/fp8`` (128x128
    FP8 blocks with ``quantization_config``), each with the tokenizer and a greedy generation config."""
    from ..checkpoint.convert import convert_checkpoint

    export_model = copy.deepcopy(model)
    for layer in export_model.model.mtp_layers:  # the official files hold separate copies of the shared tensors
        layer.embed_tokens.weight = torch.nn.Parameter(layer.embed_tokens.weight.detach().clone())
        layer.shared_head.head.weight = torch.nn.Parameter(layer.shared_head.head.weight.detach().clone())
    if fp8_training_recipe(export_model) is not None:
        convert_from_fp8_training(export_model)
    export_model.config.use_cache = True
    export_model.config.architectures = ["DeepseekV3ForCausalLM"]
    export_model.generation_config.do_sample = False
    export_model.generation_config.use_cache = True  # built while training ran without a cache
    export_model.generation_config.pad_token_id = tok.pad_token_id
    export_model.eval().to(torch.bfloat16)
    bf16 = out / "bf16"
    export_model.save_pretrained(bf16)
    tok.save_pretrained(bf16)
    fp8 = convert_checkpoint(bf16, out / "fp8", to="fp8", overwrite=True, progress=False)
    return {"bf16": str(bf16), "fp8": str(fp8)}
