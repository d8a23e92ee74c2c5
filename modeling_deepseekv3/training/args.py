"""The ``pretrain`` command's flags as a dataclass, and its presets. Light on purpose (no torch): the CLI builds
its parser from these defaults at start-up; :mod:`.pretrain` runs them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..distributed.schedules import DEFAULT_SCHEDULE

__all__ = ["PRESETS", "PretrainArgs"]

#: model configs shipped with the package (``training/presets/<name>.json``)
PRESETS = ("shakespeare", "tiny")


@dataclass
class PretrainArgs:
    """The command's flags (``deepseek-v3 pretrain --help``); names are the CLI's."""

    model_config: str
    data: list[str]
    output: str
    tokenizer: str | None = None
    vocab_size: int | None = None
    seq_len: int = 256
    global_batch_size: int = 16
    micro_batch_size: int | None = None
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    fp8: bool = False
    adam_moments: str = "fp32"
    mtp_weight: float = 0.3
    balance_alpha: float = 1e-4
    bias_update_rate: float = 1e-3
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    log_json: str | None = None
    threads: int | None = None
    dp: int | None = None
    pp: int | None = None
    pp_schedule: str = DEFAULT_SCHEDULE
    pp_overlap: bool = False
    ep: int | None = None
    progress: bool = True
    export: bool = True
    overwrite: bool = False

    def identity(self) -> dict:
        """What a resumed run must share with the one it continues: everything but step counts, I/O and the
        layout (``--micro-batch-size``, ``--dp``, ``--pp``, ``--ep``, ``--threads``: another layout continues the same run, equal
        within float rounding; the same layout continues it bit for bit)."""
        keep = (
            "seq_len",
            "global_batch_size",
            "lr",
            "warmup_steps",
            "min_lr_ratio",
            "weight_decay",
            "grad_clip",
            "seed",
            "fp8",
            "adam_moments",
            "mtp_weight",
            "balance_alpha",
            "bias_update_rate",
        )
        return {k: getattr(self, k) for k in keep}
