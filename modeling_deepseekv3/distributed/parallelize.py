"""``parallelize(model, layout)``: every training parallelism applied to a built model, once, in one order.

1. **FP8 training** (DeepSeek's recipe, :func:`~..fp8.training.convert_to_fp8_training`): swaps linears, so it
   comes first -- the parallelisms below then shard and move the swapped modules;
2. **expert parallelism** (``--ep``, :mod:`.expert_parallel`): this rank keeps 1/ep of each MoE layer's routed
   experts; all-to-all dispatch goes into each layer's dispatch seam;
3. **pipeline parallelism** (``--pp``, :mod:`.pipeline`): this rank keeps its stages' layers, the others become
   ``nn.Identity`` (names stay the single-process ones);
4. **data parallelism** (``--dp``, :mod:`.data_parallel`): FSDP2 alone; beside ``--pp``/``--ep`` the data ranks
   hold whole weights and average gradients after backward (:meth:`ParallelModel.clip_grad_norm_`).

The result, :class:`ParallelModel`, is what a training loop needs from the layout and nothing more: a forward +
backward of one global batch, the gradient norm over all ranks, the per-layer figures merged, the trained
weights gathered on rank 0. ``pretrain`` is a loop around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data_parallel import apply_data_parallel, full_state_dict
from .expert_parallel import apply_expert_parallel, replicated_parameters, sync_gradients
from .layout import Layout, mean_over_ranks
from .pipeline import PipelineTrainer
from .schedules import DEFAULT_SCHEDULE

__all__ = ["ParallelModel", "parallelize"]


@dataclass
class ParallelModel:
    """A model as this rank trains it (:func:`parallelize`)."""

    model: torch.nn.Module
    layout: Layout
    micro_batch_size: int
    micro_batches: int  # per optimizer step and data rank
    pipeline: PipelineTrainer | None = None

    @property
    def replicated(self) -> bool:
        """Data ranks holding whole weights (beside --pp / --ep): gradients averaged by hand after backward."""
        return self.layout.data > 1 and not self.layout.sharded

    def forward_backward(self, windows: torch.Tensor) -> dict[str, float]:
        """Forward + backward of one global batch ``[G, seq_len + 1]`` (the same windows on every rank; each
        data rank takes its slice), gradients accumulated as one process would (mean over micro-batches).
        Returns the loss parts averaged over the global batch: ``loss``, ``lm_loss``, ``mtp_loss``,
        ``balance_loss``."""
        if self.pipeline is not None:
            return self.pipeline.train_step(windows)
        m, n, layout = self.micro_batch_size, self.micro_batches, self.layout
        mine = slice(layout.data_rank * m, (layout.data_rank + 1) * m)
        parts = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        for i in range(n):
            batch = windows[i * m * layout.data : (i + 1) * m * layout.data][mine]  # (m, seq_len + 1)
            # position i predicts token i+1 (shift_labels: already shifted, so the window's last token counts)
            out = self.model(batch[:, :-1], shift_labels=batch[:, 1:].contiguous(), use_cache=False)
            (out.loss / n).backward()
            for key, value in (
                ("loss", out.loss),
                ("lm_loss", out.lm_loss),
                ("mtp_loss", out.mtp_loss),
                ("balance_loss", out.aux_loss),
            ):
                parts[key] += float(value.detach()) / n if value is not None else 0.0
        return mean_over_ranks(parts, layout)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Finish the gradients (replicas averaged over the data ranks, experts over their copies) and clip them
        by their norm over all ranks, each parameter counted once. Returns the norm before clipping."""
        if self.replicated:
            sync_gradients(self.model, self.layout)
        if self.pipeline is None and not self.replicated:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        held = list({id(p): p for p in self.model.parameters() if p.requires_grad}.values())
        uncounted = self.pipeline.uncounted() if self.pipeline is not None else set()
        if self.replicated:
            uncounted |= replicated_parameters(self.model, self.layout)
        return self.layout.clip_grad_norm_(held, max_norm, uncounted)

    def full_state_dict(self) -> dict | None:
        """The trained weights, whole, on rank 0 (None elsewhere; collective): FSDP's unsharded state dict, or
        each rank's held parameters merged."""
        if self.layout.pp > 1 or self.layout.ep > 1:
            return self.layout.gather_state_dict(self.model)
        return full_state_dict(self.model, self.layout)


def parallelize(
    model,
    layout: Layout,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    fp8: bool = False,
    pp_schedule: str = DEFAULT_SCHEDULE,
    pp_overlap: bool = False,
    seq_len: int | None = None,
) -> ParallelModel:
    """Apply FP8 training, expert, pipeline and data parallelism to ``model`` for ``layout`` (module docstring),
    in place and once. The model must hold its initial weights, equal on every rank (same seed)."""
    if fp8:
        from ..fp8.training import convert_to_fp8_training  # (imports the recipe's GEMMs only when asked)

        convert_to_fp8_training(model)
    if layout.ep > 1:
        apply_expert_parallel(model, layout)
    micro_batches = global_batch_size // (micro_batch_size * layout.data)
    pipeline = None
    if layout.pp > 1:
        pipeline = PipelineTrainer(
            model, layout, pp_schedule, micro_batches, (micro_batch_size, seq_len), overlap=pp_overlap
        )
    apply_data_parallel(model, layout)  # FSDP2 when the data ranks are alone; otherwise a no-op
    return ParallelModel(model, layout, micro_batch_size, micro_batches, pipeline)
