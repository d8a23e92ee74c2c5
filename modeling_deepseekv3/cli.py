"""``deepseek-v3`` command line (also ``python -m modeling_deepseekv3``).

Subcommands:
  convert     FP8 <-> BF16 conversion of an official-layout checkpoint, shard by shard, resumable
  make-tiny   write a small random checkpoint in the exact official layout
"""

from __future__ import annotations

import argparse
import sys


def _cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert_checkpoint

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
    from .conversion import make_tiny_checkpoint

    out = make_tiny_checkpoint(
        args.dir,
        fp8=not args.bf16,
        mtp=not args.no_mtp,
        num_shards=args.shards,
        seed=args.seed,
        scale_fmt=args.scale_fmt,
    )
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-v3",
        description="Tools for DeepSeek-V3-family checkpoints (V3, R1, V3.1, Kimi-K2, Moonlight).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--block-size", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"),
                   help="FP8 block size (fp8 only; default 128 128)")
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
    p.add_argument("dir", help="output directory (replaced if it exists)")
    p.add_argument("--bf16", action="store_true", help="BF16 weights instead of FP8")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    p.add_argument("--shards", type=int, default=2, help="number of safetensors shards (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scale-fmt", choices=("ue8m0",), default=None, help="power-of-two FP8 scales (V3.1 style)")
    p.set_defaults(func=_cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"deepseek-v3 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
