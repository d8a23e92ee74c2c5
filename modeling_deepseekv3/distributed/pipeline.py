"""Pipeline parallelism for training with ``torch.distributed.pipelining``: ``pretrain --pp N --pp-schedule dualpipev``.

V placement only (``dualpipev``: ``ScheduleDualPipeV``; ``zbv``: ``ScheduleZBVZeroBubble``): the model is cut into
``2 N`` stages of consecutive decoder layers and rank r holds stages r and 2N-1-r, so stage 0 (embedding) and
the last stage (final norm, head, MTP layer) share rank 0 -- the MTP layer's embedding and head, tied to the
main ones, need no cross-rank synchronisation. (Schedules with one stage per rank would put them on two ranks;
they are refused until that sync exists.)

What crosses a stage boundary is one tensor, ``[micro-batch, S, D]``; RoPE is rebuilt in each stage from the
positions, the causal mask is implicit (packed sequences and padding are not used by ``pretrain``). DeepSeek's
other losses:

* the sequence-wise balance loss of a MoE layer is computed where the layer runs and enters backward through
  :class:`_AuxLossGradient` (an identity on the hidden states whose backward also seeds the aux loss: the
  Megatron pattern), so it trains the routers of every stage without travelling to the last one;
* the MTP loss runs in the last stage's loss function, which holds the token window (rank 0 has the data);
* the aux-loss-free bias update counts, on each rank, the tokens of all micro-batches for its own layers.

Each rank keeps the full model object with the layers it does not hold replaced by ``nn.Identity``: parameter
names (checkpoint names, DCP keys, optimizer state keys) are the single-process ones, so checkpoints resume on
any layout. Gradients are averaged over micro-batches once per parameter (the embedding is shared by two stages
on rank 0) and clipped by the norm over all ranks, as one process would.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["V_SCHEDULES", "PipelineError", "PipelineTrainer", "gather_state_dict", "merge_over_ranks"]

V_SCHEDULES = ("dualpipev", "zbv")


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
    """Consecutive decoder layers of one stage (+ the embedding on stage 0, the final norm on the last)."""

    def __init__(self, model, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        from ..moe import TopkRouter

        self.layers = nn.ModuleList(model.model.layers[i] for i in layer_ids)
        self.embed_tokens = model.model.embed_tokens if first else None
        self.norm = model.model.norm if last else None
        # what the last stage's loss function runs (head, MTP layers) belongs to the stage too: zero-bubble
        # schedules compute weight gradients for the stage's own parameters only
        self.lm_head = model.lm_head if last else None
        self.mtp_layers = nn.ModuleList(model.model.mtp_layers) if last else None
        self.rotary_emb = model.model.rotary_emb
        self.alpha = model.config.balance_loss_alpha
        self.balance_total = 0.0  # this step's balance losses (for the log)
        self._routing = []
        if self.alpha:
            for layer in self.layers:
                for m in layer.modules():
                    if isinstance(m, TopkRouter):
                        m.register_forward_hook(lambda mod, args, out: self._routing.append(out))

    def forward(self, x):
        from ..training import losses

        h = self.embed_tokens(x) if self.embed_tokens is not None else x  # (B, S) ids or (B, S, D)
        b, s = h.shape[:2]
        pe = self.rotary_emb(torch.arange(s, device=h.device)[None].expand(b, s))
        aux = []
        for layer in self.layers:
            self._routing.clear()
            h = layer(h, pe)
            if self._routing and torch.is_grad_enabled():
                r = self._routing[-1]
                aux.append(losses.balance_loss(r.indices, r.logits, batch=b, alpha=self.alpha))
        if aux:  # this stage's balance terms enter backward here, once
            total = torch.stack(aux).sum()
            self.balance_total += float(total.detach())
            h = _AuxLossGradient.apply(h, total)
        return self.norm(h) if self.norm is not None else h


class PipelineTrainer:
    """The V-placed stages of this rank, their schedule, and what a training step needs around it."""

    def __init__(self, model, layout, schedule: str, micro_batches: int, mtp_weight: float, micro_batch_shape):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import ScheduleDualPipeV, ScheduleZBVZeroBubble

        pp, rank = layout.pp, layout.rank
        if schedule not in V_SCHEDULES:
            raise PipelineError(
                f"--pp-schedule {schedule}: only the V schedules ({', '.join(V_SCHEDULES)}) are implemented. They keep "
                "the embedding, head and MTP layer (which share weights) on rank 0; one-stage-per-rank schedules "
                "would need a cross-rank sync of those weights."
            )
        stages = 2 * pp
        n_layers = model.config.num_hidden_layers
        if n_layers < stages:
            raise PipelineError(f"{n_layers} decoder layers cannot fill {stages} stages (--pp {pp} x 2 for the V); "
                                "lower --pp.")
        if micro_batches < stages:
            raise PipelineError(f"{schedule} needs at least {stages} micro-batches per step (one per stage), got "
                                f"{micro_batches}; lower --micro-batch-size or raise --global-batch-size.")
        base, extra = divmod(n_layers, stages)
        sizes = [base + (1 if s < extra else 0) for s in range(stages)]
        bounds = [sum(sizes[:s]) for s in range(stages + 1)]
        mine = (rank, stages - 1 - rank)
        keep = {i for s in mine for i in range(bounds[s], bounds[s + 1])}
        self.model, self.layout, self.micro_batches, self.mtp_weight = model, layout, micro_batches, mtp_weight
        self.stage_modules = [_Stage(model, list(range(bounds[s], bounds[s + 1])), s == 0, s == stages - 1) for s in mine]
        # drop what this rank does not hold; names of what it holds stay the single-process ones
        for i in range(n_layers):
            if i not in keep:
                model.model.layers[i] = nn.Identity()
        if rank != 0:
            for i in range(n_layers, len(model.model.layers)):  # the MTP layer(s) live with the last stage
                model.model.layers[i] = nn.Identity()
            model.model.embed_tokens, model.model.norm, model.lm_head = nn.Identity(), nn.Identity(), nn.Identity()
        from ..moe.experts import RoutedExperts

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
        pipe_stages = [PipelineStage(m, s, stages, device, input_args=(ids if s == 0 else hidden,), output_args=(hidden,))
                       for m, s in zip(self.stage_modules, mine)]
        cls = ScheduleDualPipeV if schedule == "dualpipev" else ScheduleZBVZeroBubble
        self.schedule = cls(pipe_stages, n_microbatches=micro_batches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, hidden, window):
        """Last stage (rank 0): next-token CE + ``mtp_weight`` x MTP loss of one micro-batch, as one process."""
        from ..training import losses

        model = self.model
        ids, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        logits = model.lm_head(hidden)
        lm = model.loss_function(logits=logits, labels=None, vocab_size=model.config.vocab_size, shift_labels=labels)
        total = lm
        self._parts["lm_loss"] += float(lm.detach())
        if model.model.mtp_layers and self.mtp_weight:
            mtp = losses.mtp_loss(model, ids, hidden, labels, None)
            self._parts["mtp_loss"] += float(mtp.detach())
            total = total + self.mtp_weight * mtp
        return total

    def _params(self) -> list[torch.nn.Parameter]:
        return list({id(p): p for p in self.model.parameters() if p.requires_grad}.values())

    def train_step(self, windows: torch.Tensor) -> dict[str, float]:
        """Forward + backward of one global batch ``[G, seq_len + 1]`` (every rank passes the same windows; rank 0
        feeds them); gradients averaged over the micro-batches. Returns the loss parts as one process logs them."""
        for m in self.stage_modules:
            m.balance_total = 0.0
        self._parts = {"lm_loss": 0.0, "mtp_loss": 0.0}
        if self.layout.rank == 0:
            self.schedule.step(windows[:, :-1].contiguous(), target=windows.contiguous())
        else:
            self.schedule.step()
        for p in self._params():
            if p.grad is not None:
                p.grad.div_(self.micro_batches)
        t = torch.tensor([self._parts["lm_loss"], self._parts["mtp_loss"],
                          sum(m.balance_total for m in self.stage_modules)], dtype=torch.float64)
        dist.all_reduce(t)
        lm, mtp, balance = (float(v) / self.micro_batches for v in t.tolist())
        return {"loss": lm + self.mtp_weight * mtp + balance, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance}

    def clip_grad_norm(self, max_norm: float) -> float:
        """``clip_grad_norm_`` over the parameters of every rank (each parameter lives on exactly one)."""
        grads = [p.grad for p in self._params() if p.grad is not None]
        local = torch.stack([g.detach().float().norm() ** 2 for g in grads]).sum() if grads else torch.zeros(())
        total = local.double().reshape(1)
        dist.all_reduce(total)
        norm = math.sqrt(float(total))
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm


def gather_state_dict(model, layout) -> dict | None:
    """Every rank's parameters and buffers (each held by one rank; the rest replaced by ``nn.Identity``) merged on
    rank 0 (None on the others; collective)."""
    mine = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    parts = [None] * dist.get_world_size() if layout.rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if layout.rank != 0:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def merge_over_ranks(values: dict) -> dict:
    """Per-layer figures (e.g. expert-load imbalance), each layer held by one rank, merged on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged
