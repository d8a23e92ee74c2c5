"""Pipeline parallelism for training with ``torch.distributed.pipelining``: ``pretrain --pp N --pp-schedule S``.

Schedules (``SCHEDULES``) and where they put the ``stages`` (consecutive decoder layers; stage 0 also embeds,
the last also normalizes and holds the head and the MTP layer):

* V placement, ``2 N`` stages, rank r holds stages r and 2N-1-r: ``dualpipev`` (``ScheduleDualPipeV``) and
  ``zbv`` (``ScheduleZBVZeroBubble``). Stage 0 and the last stage share rank 0, so the MTP layer's embedding
  and head -- the main ones, shared -- live on one rank.
* one stage per rank, ``N`` stages: ``gpipe``, ``1f1b``; looped, ``2 N`` stages, rank r holds r and r + N:
  ``interleaved1f1b``. The last stage then sits on rank N-1, whose MTP layer needs the embedding too: that rank
  keeps a replica, and after every backward the two ranks sum its gradient (one all-reduce between them:
  Megatron's embedding group), so both copies take the same optimizer steps and stay equal.

What crosses a stage boundary is one tensor, ``[micro-batch, S, D]``; RoPE is rebuilt in each stage from the
positions, the causal mask is implicit (packed sequences and padding are not used by ``pretrain``). DeepSeek's
other losses:

* the sequence-wise balance loss of a MoE layer is computed where the layer runs and enters backward through
  :class:`_AuxLossGradient` (an identity on the hidden states whose backward also seeds the aux loss: the
  Megatron pattern), so it trains the routers of every stage without travelling to the last one;
* the MTP loss runs in the last stage's loss function, which holds the token window (rank 0 feeds the data);
* the aux-loss-free bias update counts, on each rank, the tokens of all micro-batches for its own layers.

Each rank keeps the full model object with the layers it does not hold replaced by ``nn.Identity``: parameter
names (checkpoint names, DCP keys, optimizer state keys) are the single-process ones, so checkpoints resume on
any layout. Gradients are averaged over micro-batches once per parameter (the embedding is shared by two stages
on rank 0 under V placement) and clipped by the norm over all ranks, each parameter counted once, as one
process would.

With ``--dp`` (or ``--ep``) the ranks form a ``pp x dp`` grid: each pipeline (a column of the grid) takes 1/dp
of the batch, holds its stages' weights whole and averages their gradients with the other pipelines; with
``--ep`` groups of ranks of one pipeline position shard the routed experts of their layers between them
(:mod:`.expert_parallel`); every pipeline runs the same schedule, so the all-to-alls of one position pair up in
order.

``timeline=True`` records every compute action (forward, backward, weight-gradient chunk, the last stage's loss)
with its start and end, for ``benchmarks/pipeline.py``'s measured bubbles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..core.model import total_loss
from .schedules import RUNNABLE, schedule_named

__all__ = [
    "SCHEDULES",
    "PipelineError",
    "PipelineTrainer",
    "num_stages",
    "stage_ids",
    "torch_schedule",
]

SCHEDULES = RUNNABLE  # what pretrain runs; the whole vocabulary, with placements, is .schedules.SCHEDULES


def stage_ids(schedule: str, pp: int, pp_rank: int) -> tuple[int, ...]:
    """The stages pipeline rank ``pp_rank`` holds under ``schedule``."""
    return schedule_named(schedule).stage_ids(pp, pp_rank)


def num_stages(schedule: str, pp: int) -> int:
    return schedule_named(schedule).num_stages(pp)


def torch_schedule(name: str) -> type:
    """The ``torch.distributed.pipelining`` class that runs schedule ``name`` (one of :data:`SCHEDULES`)."""
    from torch.distributed import pipelining

    return {
        "dualpipev": pipelining.schedules.ScheduleDualPipeV,
        "zbv": pipelining.schedules.ScheduleZBVZeroBubble,
        "gpipe": pipelining.ScheduleGPipe,
        "1f1b": pipelining.Schedule1F1B,
        "interleaved1f1b": pipelining.ScheduleInterleaved1F1B,
    }[name]


class PipelineError(ValueError):
    """A pipeline layout that cannot run; the message names the flag and what to change."""


class _AuxLossGradient(torch.autograd.Function):
    """``y = x`` in forward; in backward ``dx = dy`` and the aux loss gets gradient 1 (its own term of the loss).
    A copy, not a view: the schedules detach stage outputs in place."""

    @staticmethod
    def forward(ctx, hidden, aux_loss):
        ctx.save_for_backward(aux_loss)
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


class _Stage(nn.Module):
    """One stage: consecutive decoder layers (+ the embedding on stage 0; the final norm, head and MTP layer on
    the last). Its forward IS the model's forward over its slice of layers (``DeepseekV3Model.forward(...,
    layers=...)``), and its balance terms are the model's ``balance_objective``; the module itself only owns
    the stage's parameters (what zero-bubble schedules compute weight gradients for) and carries the balance
    loss into backward."""

    def __init__(self, model, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.layers = nn.ModuleList(model.model.layers[i] for i in layer_ids)
        self.embed_tokens = model.model.embed_tokens if first else None
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp_layers = nn.ModuleList(model.model.mtp_layers) if last else None
        self._model = (model,)  # not a submodule: the stage owns only its own parameters
        self._slice = slice(layer_ids[0], layer_ids[-1] + 1)
        self.alpha = model.config.balance_loss_alpha
        self.balance_total = 0.0  # this step's balance losses (for the log)

    def forward(self, x):
        model = self._model[0]
        first = self.embed_tokens is not None
        balance = bool(self.alpha) and torch.is_grad_enabled()
        out = model.model(  # x: (B, S) ids on stage 0, else the previous stage's (B, S, D)
            input_ids=x if first else None,
            inputs_embeds=None if first else x,
            layers=self._slice,
            use_cache=False,
            output_router_logits=balance,
            output_router_indices=balance,
            return_dict=True,
        )
        h = out.last_hidden_state
        if balance and out.router_logits:  # this stage's balance terms enter backward here, once
            total = model.balance_objective(out.router_indices, out.router_logits, batch=h.shape[0])
            self.balance_total += float(total.detach())
            h = _AuxLossGradient.apply(h, total)
        return h


class PipelineTrainer:
    """This rank's stages, their schedule, and what a training step needs around it."""

    def __init__(
        self,
        model,
        layout,
        schedule: str,
        micro_batches: int,
        micro_batch_shape,
        timeline: bool = False,
        overlap: bool = False,
    ):
        from torch.distributed.pipelining import PipelineStage

        try:
            placement = schedule_named(schedule, to_run=True).placement
        except ValueError as e:
            raise PipelineError(str(e)) from None
        if overlap and schedule != "dualpipev":
            raise PipelineError(
                f"--pp-overlap runs DualPipeV's overlapped forward+backward pairs; --pp-schedule "
                f"{schedule} has none. Use --pp-schedule dualpipev or drop --pp-overlap."
            )
        pp, pp_rank = layout.pp, layout.pp_rank
        stages = num_stages(schedule, pp)
        n_layers = model.config.num_hidden_layers
        if n_layers < stages:
            raise PipelineError(
                f"{n_layers} decoder layers cannot fill the {stages} stages of --pp {pp} "
                f"--pp-schedule {schedule}; lower --pp (or choose a one-stage-per-rank schedule)."
            )
        if micro_batches < stages:
            raise PipelineError(
                f"{schedule} needs at least {stages} micro-batches per step (one per stage), got "
                f"{micro_batches}; lower --micro-batch-size or raise --global-batch-size."
            )
        base, extra = divmod(n_layers, stages)
        sizes = [base + (1 if s < extra else 0) for s in range(stages)]
        bounds = [sum(sizes[:s]) for s in range(stages + 1)]
        mine = stage_ids(schedule, pp, pp_rank)
        first, last = 0 in mine, stages - 1 in mine
        last_rank = next(r for r in range(pp) if stages - 1 in stage_ids(schedule, pp, r))
        keep = {i for s in mine for i in range(bounds[s], bounds[s + 1])}
        self.model, self.layout, self.micro_batches = model, layout, micro_batches
        self.stage_modules = [
            _Stage(model, list(range(bounds[s], bounds[s + 1])), s == 0, s == stages - 1) for s in mine
        ]
        has_mtp = bool(model.model.mtp_layers)
        # the MTP layer on another rank than the embedding: a replica there, its gradient summed between the two
        self._embedding_group = None
        self._embedding_replica = has_mtp and last_rank != 0 and last
        if has_mtp and last_rank != 0:
            d, data = layout.data_rank, layout.data
            groups = [dist.new_group([c, (last_rank * data) + c]) for c in range(data)]  # collective: every rank
            if first or last:
                self._embedding_group = groups[d]
        # drop what this rank does not hold; names of what it holds stay the single-process ones
        for i in range(n_layers):
            if i not in keep:
                model.model.layers[i] = nn.Identity()
        if not last:
            for i in range(n_layers, len(model.model.layers)):  # the MTP layer(s) live with the last stage
                model.model.layers[i] = nn.Identity()
            model.model.norm, model.lm_head = nn.Identity(), nn.Identity()
        if not (first or self._embedding_replica):
            model.model.embed_tokens = nn.Identity()
        from ..core.moe.experts import RoutedExperts

        for experts in (m for m in model.modules() if isinstance(m, RoutedExperts)):
            experts.grouped = False  # training only; no re-homing of weights shared with the stage views
        self._parts = {"lm_loss": 0.0, "mtp_loss": 0.0}
        device = torch.device("cpu")
        # static shapes (micro-batch, seq_len): no metadata-inference forward, which would run the routers (and
        # the load counting) on placeholder tensors
        mb, seq = micro_batch_shape
        dtype = next(p.dtype for p in self.stage_modules[0].parameters() if p.is_floating_point())
        # (requires_grad: static metadata copies it, and activations between stages carry gradients)
        hidden = torch.empty(mb, seq, model.config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
        ids = torch.empty(mb, seq, dtype=torch.long, device="meta")
        pipe_stages = [
            PipelineStage(
                m,
                s,
                stages,
                device,
                input_args=(ids if s == 0 else hidden,),
                output_args=(hidden,),
                group=layout.pp_group,
            )
            for m, s in zip(self.stage_modules, mine)
        ]
        self.timeline: list[tuple[str, int, float, float]] | None = [] if timeline else None
        if timeline:
            for st in pipe_stages:
                _record_actions(st, self.timeline)
        cls = torch_schedule(schedule)
        target = pipe_stages if placement != "single" else pipe_stages[0]
        self.schedule = cls(target, n_microbatches=micro_batches, loss_fn=self._loss, scale_grads=False)
        if overlap:
            from torch.distributed.pipelining.schedules import _ComputationType

            self.schedule.register_custom_function(_ComputationType.OVERLAP_F_B, self._overlapped)
        self._feeds, self._reads_targets = first, last

    def _loss(self, hidden, window):
        """Last stage: next-token CE + ``mtp_loss_weight`` x MTP loss of one micro-batch, as one process (timed as
        action "L" under ``timeline``: the schedules run it outside the stage's forward)."""
        if self.timeline is not None:
            import time

            t0 = time.perf_counter()
            try:
                return self._loss_of(hidden, window)
            finally:
                self.timeline.append(("L", -1, t0, time.perf_counter()))
        return self._loss_of(hidden, window)

    def _loss_of(self, hidden, window):
        model = self.model  # the model's own terms and sum (core/model.py); the balance terms were added per stage
        ids, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        logits = model.lm_head(hidden)
        lm = model.loss_function(logits=logits, labels=None, vocab_size=model.config.vocab_size, shift_labels=labels)
        self._parts["lm_loss"] += float(lm.detach())
        mtp = None
        if model.model.mtp_layers and model.config.mtp_loss_weight:
            mtp = model.mtp_objective(ids, hidden, labels)
            self._parts["mtp_loss"] += float(mtp.detach())
        return total_loss(lm, mtp, None, model.config.mtp_loss_weight, training=True)

    # -- DualPipeV's overlapped pairs -----------------------------------------------------------------------------
    def _overlapped(self, action, ctx) -> None:
        """One ``OVERLAP_F_B`` action: the forward chunk of one micro-batch (one arm of the V) runs here while the
        full backward of another (the other arm) runs in a second thread, so one's communication (the
        expert-parallel all-to-alls, on their own communicators per direction) can hide behind the other's
        compute, and on a machine with spare cores the two computations run side by side. The two touch different
        stages, different micro-batches and different schedule state; what they share (the losses list, read for
        an earlier micro-batch than the one appended) is safe under the GIL. The steps are those of the runtime's
        own FORWARD and FULL_BACKWARD actions (torch 2.13 ``_PipelineScheduleRuntime``), which run the pair one after
        the other without this function."""
        import threading

        sched = ctx.schedule_ref
        fwd, bwd = action.sub_actions
        stages = {st.stage_index: st for st in sched._stages}
        if fwd.stage_index == bwd.stage_index:  # not a DualPipeV pair: nothing to overlap
            self._forward_action(sched, stages, fwd, ctx)
            self._backward_action(sched, stages, bwd)
            return
        failed: list[BaseException] = []

        def backward():
            try:
                self._backward_action(sched, stages, bwd)
            except BaseException as e:  # re-raised in the schedule's thread
                failed.append(e)

        worker = threading.Thread(target=backward, name="dualpipev-backward")
        worker.start()
        try:
            self._forward_action(sched, stages, fwd, ctx)
        finally:
            worker.join()
        if failed:
            raise failed[0]

    @staticmethod
    def _forward_action(sched, stages, a, ctx) -> None:
        from torch.distributed.pipelining.schedules import _wait_batch_p2p

        stage, mb = stages[a.stage_index], a.microbatch_index
        if not stage.is_first and a.stage_index - 1 not in stages:  # input from another rank
            _wait_batch_p2p(sched.fwd_recv_ops.pop((a.stage_index, mb)))
        output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=True)
        sched._maybe_compute_loss(stage, output, ctx.target_mbs, mb, None)
        if a.stage_index + 1 in stages:  # the V's turn on this rank: no communication
            stages[a.stage_index + 1].set_local_fwd_input(output, mb)

    @staticmethod
    def _backward_action(sched, stages, a) -> None:
        from torch.distributed.pipelining.schedules import _wait_batch_p2p

        stage, mb = stages[a.stage_index], a.microbatch_index
        if not stage.is_last and a.stage_index + 1 not in stages:  # output gradient from another rank
            _wait_batch_p2p(sched.bwd_recv_ops.pop((a.stage_index, mb)))
        loss = sched._maybe_get_loss(stage, mb)
        sched.backward_counter[a.stage_index] += 1
        last = sched.backward_counter[a.stage_index] == sched._n_microbatches
        stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
        if a.stage_index - 1 in stages:
            stages[a.stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

    def _params(self) -> list[torch.nn.Parameter]:
        return list({id(p): p for p in self.model.parameters() if p.requires_grad}.values())

    def train_step(self, windows: torch.Tensor) -> dict[str, float]:
        """Forward + backward of one global batch ``[G, seq_len + 1]`` (every rank passes the same windows; each
        pipeline takes its 1/data share, its first stage feeds it, its last stage reads the targets); gradients
        averaged over the micro-batches. Returns the loss parts as one process logs them."""
        for m in self.stage_modules:
            m.balance_total = 0.0
        self._parts = {"lm_loss": 0.0, "mtp_loss": 0.0}
        if self.timeline is not None:
            self.timeline.clear()
        data, d = self.layout.data, self.layout.data_rank
        share = windows.shape[0] // data
        windows = windows[d * share : (d + 1) * share].contiguous()
        args = (windows[:, :-1].contiguous(),) if self._feeds else ()
        self.schedule.step(*args, target=windows if self._reads_targets else None)
        for p in self._params():
            if p.grad is not None:
                p.grad.div_(self.micro_batches)
        if self._embedding_group is not None:  # the embedding's two copies: main use + MTP use
            w = self.model.model.embed_tokens.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            dist.all_reduce(w.grad, group=self._embedding_group)
        t = torch.tensor(
            [self._parts["lm_loss"], self._parts["mtp_loss"], sum(m.balance_total for m in self.stage_modules)],
            dtype=torch.float64,
        )
        dist.all_reduce(t)
        lm, mtp, balance = (float(v) / (self.micro_batches * data) for v in t.tolist())
        return {
            "loss": lm + self.model.config.mtp_loss_weight * mtp + balance,
            "lm_loss": lm,
            "mtp_loss": mtp,
            "balance_loss": balance,
        }

    def uncounted(self) -> set[int]:
        """``id``s of parameters held here whose gradient norm another rank counts (the embedding replica)."""
        if self._embedding_replica and self.layout.pp_rank != 0:
            return {id(self.model.model.embed_tokens.weight)}
        return set()


def _record_actions(stage, timeline: list) -> None:
    """Wrap a ``PipelineStage``'s compute entry points to append ``(action, stage, start, end)`` to ``timeline``
    (``time.perf_counter`` seconds): F = forward, B = full or input backward, W = weight backward."""
    import time

    for name, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"), ("backward_weight_one_chunk", "W")):
        inner = getattr(stage, name)

        def timed(*args, _inner=inner, _kind=kind, **kwargs):
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                timeline.append((_kind, stage.stage_index, t0, time.perf_counter()))

        setattr(stage, name, timed)
