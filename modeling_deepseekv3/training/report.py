"""What a pretraining run leaves for people: a loss-curve PNG and a model card (``README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CARD_TITLE", "is_model_card", "write_loss_curve", "write_model_card"]

# the card's first line; ``pretrain`` replaces a README.md only when it starts so (a user's own README is kept)
CARD_TITLE = "# A DeepSeek-V3 in miniature, pretrained with `deepseek-v3 pretrain`"


def write_loss_curve(
    history: list[dict], path: Path, title: str = "Pretraining loss", held_out: str | None = None, mtp_weight=None
) -> str | None:
    """Train (LM and MTP) and held-out loss against steps, titled, the held-out text named and its last
    bits/byte (the card's unit) in the legend; None (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.plot(steps, [h["lm_loss"] for h in history], lw=0.8, alpha=0.8, label="train: next-token loss (token i+1)")
    if any(h.get("mtp_loss") for h in history):
        weight = f", weight {mtp_weight:g}" if mtp_weight is not None else ""
        ax.plot(
            steps,
            [h["mtp_loss"] for h in history],
            lw=0.8,
            alpha=0.6,
            label=f"train: MTP loss (token i+2{weight}): it also sees token i+1 and adds a layer, so it may sit lower",
        )
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        last = evals[-1].get("eval_bits_per_byte")
        label = f"held-out loss ({held_out or 'held-out text'})" + (f"; last {last:.3f} bits/byte" if last else "")
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", ms=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _attribution(data: list[str]) -> list[str]:
    """Lines crediting the training text: the ``SOURCE.json`` a data-preparation script left beside the data
    (``scripts/prepare_shakespeare.py`` writes one: package, checksum, license), if any."""
    for spec in data:
        here = Path(spec.split("*")[0] or ".")
        for folder in (here, *here.parents[:2]):
            source = folder / "SOURCE.json"
            if source.is_file():
                info = json.loads(source.read_text())
                fields = ", ".join(
                    f"{k}: {v}" for k, v in info.items() if k in ("package", "works", "held_out", "sdist_sha256")
                )
                return [f"- source: {fields}", f"- license: {info.get('license', 'see ' + str(source))}"]
    return ["- source and license: not recorded (no SOURCE.json beside the data); credit the text's authors here."]


def is_model_card(path: Path) -> bool:
    """Whether ``path`` is a card :func:`write_model_card` wrote (and so may be written over)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") == CARD_TITLE
    except OSError:
        return False


def write_model_card(out: Path, args, config, summary: dict, model) -> Path:
    """``out/README.md``: what was trained on what, how, and what it scores -- for the exports too."""
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    final = summary.get("final", {})
    lines = [
        CARD_TITLE,
        "",
        f"{n_params / 1e6:.1f}M parameters ({config.num_hidden_layers} layers: {config.first_k_dense_replace} dense, "
        f"{config.num_hidden_layers - config.first_k_dense_replace} MoE with {config.n_routed_experts} routed experts "
        f"(top-{config.num_experts_per_tok}, {config.n_group} groups / {config.topk_group} kept) + "
        f"{config.n_shared_experts} shared; MLA with q/kv low rank {config.q_lora_rank}/{config.kv_lora_rank}; "
        f"{config.num_nextn_predict_layers} MTP layer; vocabulary {config.vocab_size}).",
        "",
        "## Training",
        f"- data: {summary.get('train_data')}; held out: {summary.get('eval_data')}",
        *_attribution(args.data),
        f"- {summary.get('steps')} steps x {args.global_batch_size} sequences x {args.seq_len} tokens = "
        f"{summary.get('tokens'):,} tokens; AdamW (0.9, 0.95, wd {args.weight_decay}), lr {args.lr} "
        f"(warm-up {args.warmup_steps}, cosine to {args.min_lr_ratio:g}x), clip {args.grad_clip}, seed {args.seed}",
        f"- DeepSeek-V3's objective: MTP weight {args.mtp_weight}, sequence-wise balance loss alpha "
        f"{args.balance_alpha}, aux-loss-free bias update rate {args.bias_update_rate}"
        + (", FP8 training recipe (1x128 / 128x128 tiles)" if args.fp8 else ""),
        "",
        "## Results",
        "```",
        json.dumps(final, indent=1),
        "```",
        "",
        "![loss curve](loss_curve.png)" if summary.get("loss_curve") else "",
        "",
        "## Files",
        "- `bf16/`: official layout, BF16; `fp8/`: official FP8 layout (128x128 blocks, `weight_scale_inv`).",
        "  Both load with `modeling_deepseekv3.DeepseekV3ForCausalLM.from_pretrained`, and with any Auto class given",
        "  `trust_remote_code=True` (their `auto_map` names this package). transformers-native loads `bf16/`; its FP8",
        "  loader cannot read `fp8/` on CPU (a partial 128-block, as in the official V3), so give native the BF16 copy.",
        f"- Evaluate with the training window: lm-eval `--model_args pretrained=DIR,trust_remote_code=True,max_length="
        f"{args.seq_len}` (its default window, `max_position_embeddings`, scores text the model never saw in one piece).",
        "- `checkpoints/`: training state (torch.distributed.checkpoint) for `--resume`.",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
