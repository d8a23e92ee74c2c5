"""Training layouts on paper: ``deepseek-v3 plan CONFIG --train --pp 16 --pp-schedule dualpipe --ep 64 --dp 128``.

Per-rank memory of a pipeline x expert x data parallel layout (weights, gradients, optimizer states,
activations in flight for the schedule) and the schedule's bubble, from the config alone -- no model is
built, so the real 671B config plans in milliseconds. Nothing here imports ``torch.distributed``.

Conventions (DeepSeek-V3 report §3.2-3.3, DualPipe's README table):

* ranks = ``pp`` x ``dp``; expert parallelism borrows from data parallelism (``ep`` divides ``dp``): routed
  experts are sharded over ``ep`` ranks and replicated ``dp / ep`` times, everything else replicated ``dp``
  times. ZeRO-1 (the report's choice) shards optimizer states over the replicas of each parameter.
* Bytes per parameter: BF16 weights (2), FP32 gradients (4, the report keeps them for accumulation), FP32
  master weights (4) and AdamW moments (2 x 4, or 2 x 2 with BF16 moments as in the report).
* Stages, activations in flight and the bubble come from the schedule (:mod:`.schedules`, the vocabulary
  ``pretrain --pp-schedule`` shares, with each figure's source). Layers are split evenly over the stages; the
  embedding joins stage 0, the final norm, head and MTP layer the last stage.
* Saved bytes per token per layer are counted from the tensors each block keeps for backward (inputs of every
  linear, attention output and softmax statistics, SwiGLU gate/up outputs per routed assignment), BF16; with
  ``fp8`` the linear inputs (and the SwiGLU inputs) are cached in FP8 (1 byte), and with ``recompute`` MLA's
  up-projected q/k/v and the SwiGLU outputs are recomputed instead of stored, as the report does. An estimate,
  not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedules import DEFAULT_SCHEDULE, SCHEDULES

__all__ = ["SCHEDULES", "TrainLayout", "TrainPlan", "TrainPlanError", "parameter_counts", "plan_training"]
GiB = 2**30


class TrainPlanError(ValueError):
    """A layout that cannot run; the message names the flag and what to change."""


def _attention_params(c) -> int:
    h, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    q = (
        c.hidden_size * h * qk
        if not c.q_lora_rank
        else c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk
    )
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + h * c.v_head_dim * c.hidden_size + 2 * c.hidden_size  # + input / post-attention norms


def _layer_params(c, moe: bool) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of one decoder block."""
    attn = _attention_params(c)
    if not moe:
        return attn + 3 * c.hidden_size * c.intermediate_size, 0
    shared = 3 * c.hidden_size * c.moe_intermediate_size * (c.n_shared_experts or 0)
    router = c.n_routed_experts * c.hidden_size + c.n_routed_experts
    return attn + shared + router, c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size


def _is_moe(c, i: int) -> bool:
    return c.n_routed_experts and i >= c.first_k_dense_replace and i % (c.moe_layer_freq or 1) == 0


def parameter_counts(config) -> dict[str, int]:
    """Parameters by part, from the config: ``embedding``, ``head`` (+ final norm), ``layers`` (non-expert),
    ``experts`` (routed), ``mtp`` (the MTP blocks without their embedding/head, which training ties to the main
    ones), ``total`` (main model + MTP) and ``activated`` (per token: non-expert + top-k of the routed)."""
    c = config
    counts = {"embedding": c.vocab_size * c.hidden_size, "head": c.vocab_size * c.hidden_size + c.hidden_size}
    counts["layers"] = counts["experts"] = 0
    for i in range(c.num_hidden_layers):
        dense, experts = _layer_params(c, _is_moe(c, i))
        counts["layers"] += dense
        counts["experts"] += experts
    n_mtp = c.num_nextn_predict_layers or 0
    mtp_dense, mtp_experts = _layer_params(c, bool(c.n_routed_experts))
    counts["mtp"] = n_mtp * (
        mtp_dense + mtp_experts + 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + c.hidden_size
    )
    counts["total"] = counts["embedding"] + counts["head"] + counts["layers"] + counts["experts"] + counts["mtp"]
    active_share = (c.num_experts_per_tok / c.n_routed_experts) if c.n_routed_experts else 0
    counts["activated"] = (
        counts["embedding"] + counts["head"] + counts["layers"] + round(counts["experts"] * active_share)
    )
    return counts


def _saved_bytes_per_token(c, moe: bool, fp8: bool, recompute: bool) -> float:
    """Bytes one token keeps for backward in one block (module docstring); BF16, linear inputs FP8 with ``fp8``.
    ``recompute``: the report's §3.2.3 choices -- MLA's up-projected q, k, v are recomputed from the cached
    latents, and SwiGLU outputs from their cached inputs, in backward instead of stored."""
    lin = 1 if fp8 else 2
    h, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    q_lora = c.q_lora_rank or 0
    attn = lin * (c.hidden_size + q_lora + c.hidden_size + c.kv_lora_rank + h * c.v_head_dim)  # linear inputs
    attn += 4 * h + 2 * h * c.v_head_dim  # softmax statistics (fp32) and attention output
    if not recompute:
        attn += 2 * (h * qk + h * qk + h * c.v_head_dim)  # q, k, v

    def swiglu(inter: int) -> int:
        """Gate/up outputs (the SwiGLU inputs: FP8 under the recipe) and, unless recomputed, the down input."""
        return 2 * lin * inter + (0 if recompute else lin * inter)

    if not moe:
        return attn + lin * c.hidden_size + swiglu(c.intermediate_size)
    k, inter = c.num_experts_per_tok, c.moe_intermediate_size
    routed = k * (lin * c.hidden_size + swiglu(inter))  # per assignment: the dispatched input + its SwiGLU
    shared = (lin * c.hidden_size + swiglu(inter * c.n_shared_experts)) if c.n_shared_experts else 0
    return attn + routed + shared + 4 * c.n_routed_experts  # + router scores (fp32)


@dataclass
class TrainLayout:
    """``pp`` pipeline ranks with ``schedule``, ``dp`` data-parallel ranks of which ``ep`` share the experts."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    schedule: str = DEFAULT_SCHEDULE
    micro_batches: int = 1
    micro_batch_size: int = 1
    seq_len: int = 4096
    zero1: bool = True
    adam_moments: str = "bf16"
    fp8: bool = True
    recompute: bool = True


@dataclass
class TrainPlan:
    layout: TrainLayout
    counts: dict[str, int]
    stages: int
    layers_per_stage: list[int]
    rank_params: dict[str, int]  # the busiest rank: non_expert, experts (its shard)
    memory: dict[str, float]  # bytes: weights, gradients, optimizer, activations, total
    in_flight: float  # micro-batches of one stage kept for backward
    bubble_formula: str
    bubble: float  # in F units
    step: float  # compute per rank per step in F units

    @property
    def bubble_fraction(self) -> float:
        return self.bubble / (self.bubble + self.step)

    def fits(self, gpu_bytes: float | None) -> bool | None:
        return None if gpu_bytes is None else self.memory["total"] <= gpu_bytes

    def report(self, gpu_bytes: float | None = None) -> str:
        lay, c = self.layout, self.counts
        ranks = lay.pp * lay.dp
        lines = [
            f"parameters: {c['total'] / 1e9:.1f}B ({(c['total'] - c['mtp']) / 1e9:.1f}B main + {c['mtp'] / 1e9:.1f}B MTP; "
            f"routed experts {c['experts'] / 1e9:.1f}B; activated per token {c['activated'] / 1e9:.1f}B)",
            f"layout: PP {lay.pp} ({lay.schedule}, {self.stages} stages of {'/'.join(map(str, sorted(set(self.layers_per_stage))))} "
            f"layers) x DP {lay.dp} (EP {lay.ep} inside it) = {ranks} ranks; {lay.micro_batches} micro-batches of "
            f"{lay.micro_batch_size} x {lay.seq_len} tokens per step "
            f"({lay.micro_batches * lay.micro_batch_size * lay.dp} sequences)",
            f"busiest rank: {self.rank_params['non_expert'] / 1e9:.2f}B non-expert + {self.rank_params['experts'] / 1e9:.2f}B "
            "expert parameters",
            f"  weights (BF16)                                {self.memory['weights'] / GiB:8.1f} GiB",
            f"  gradients (FP32)                              {self.memory['gradients'] / GiB:8.1f} GiB",
            f"  optimizer                                     {self.memory['optimizer'] / GiB:8.1f} GiB  (FP32 master + "
            f"{lay.adam_moments.upper()} AdamW moments{', ZeRO-1 over the replicas' if lay.zero1 else ''})",
            f"  activations ({self.in_flight:g} stage micro-batches in flight{', FP8-cached inputs' if lay.fp8 else ''}"
            f"{', MLA up-projections and SwiGLU recomputed' if lay.recompute else ''}): {self.memory['activations'] / GiB:.1f} GiB "
            f"(~{self.memory['activations'] / GiB / max(1, self.in_flight):.1f} GiB per stage micro-batch; an estimate)",
            f"  total                                         {self.memory['total'] / GiB:8.1f} GiB"
            + (
                ""
                if gpu_bytes is None
                else f"  ({'fits' if self.fits(gpu_bytes) else 'DOES NOT FIT'} in {gpu_bytes / GiB:.0f} GiB)"
            ),
            f"bubble: {self.bubble_formula} = {self.bubble:g} F per step against {self.step:g} F of compute per rank "
            f"({self.bubble_fraction:.1%} idle; F=1, B=2, W=1, F&B=F+B: no overlap credit)",
        ]
        return "\n".join(lines)


def plan_training(config, layout: TrainLayout) -> TrainPlan:
    """Plan ``layout`` for ``config`` (module docstring). Raises :class:`TrainPlanError` for a layout that cannot
    run: naming the flag and the fix."""
    c, lay = config, layout
    if lay.schedule not in SCHEDULES:
        raise TrainPlanError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {lay.schedule!r}.")
    for name in ("pp", "dp", "ep", "micro_batches", "micro_batch_size", "seq_len"):
        if getattr(lay, name) < 1:
            raise TrainPlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(lay, name)}.")
    if lay.dp % lay.ep:
        raise TrainPlanError(
            f"--ep {lay.ep} must divide --dp {lay.dp}: expert parallelism borrows data-parallel ranks."
        )
    if c.n_routed_experts and c.n_routed_experts % lay.ep:
        raise TrainPlanError(
            f"--ep {lay.ep} must divide n_routed_experts {c.n_routed_experts} (whole experts per rank)."
        )
    if lay.schedule == "dualpipe" and lay.pp % 2:
        raise TrainPlanError(
            f"--pp-schedule dualpipe needs an even --pp (got {lay.pp}): ranks pair up in both directions."
        )
    sched = SCHEDULES[lay.schedule]
    stages = sched.num_stages(lay.pp)
    if c.num_hidden_layers < stages:
        raise TrainPlanError(f"{c.num_hidden_layers} layers cannot fill {stages} pipeline stages; lower --pp.")
    if lay.micro_batches < stages:
        raise TrainPlanError(
            f"--micro-batches {lay.micro_batches} is fewer than the {stages} stages {lay.schedule} keeps "
            "busy; raise it (the schedule needs at least one micro-batch per stage)."
        )
    counts = parameter_counts(c)
    base, extra = divmod(c.num_hidden_layers, stages)
    per_stage = [base + (1 if s < extra else 0) for s in range(stages)]
    bounds = [sum(per_stage[:s]) for s in range(stages + 1)]

    def stage_params(s: int) -> tuple[int, int]:
        dense = experts = 0
        for i in range(bounds[s], bounds[s + 1]):
            d, e = _layer_params(c, _is_moe(c, i))
            dense, experts = dense + d, experts + e
        if s == 0:
            dense += counts["embedding"]
        if s == stages - 1:  # final norm + head + MTP (its embedding/head tied to the main ones in training)
            mtp_dense, mtp_experts = _layer_params(c, bool(c.n_routed_experts))
            n = c.num_nextn_predict_layers or 0
            dense += counts["head"] + n * (
                mtp_dense + 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + c.hidden_size
            )
            experts += n * mtp_experts
        return dense, experts

    best = None
    for r in range(lay.pp):
        d = sum(stage_params(s)[0] for s in sched.stage_ids(lay.pp, r))
        e = sum(stage_params(s)[1] for s in sched.stage_ids(lay.pp, r)) / lay.ep
        if best is None or d + e > best[0] + best[1]:
            best = (d, e, r)
    dense, experts, _ = best
    params = dense + experts
    moments = 4 if lay.adam_moments == "bf16" else 8
    opt_dense = (4 + moments) * dense / (lay.dp if lay.zero1 else 1)
    opt_experts = (4 + moments) * experts / ((lay.dp // lay.ep) if lay.zero1 else 1)

    # activations: micro-batches of one stage in flight, each stage = its layers' saved bytes per token
    in_flight = sched.in_flight(stages, lay.micro_batches)
    layer_bytes = [_saved_bytes_per_token(c, _is_moe(c, i), lay.fp8, lay.recompute) for i in range(c.num_hidden_layers)]
    stage_layers = max(per_stage)
    per_layer = max(layer_bytes)
    tokens = lay.micro_batch_size * lay.seq_len
    activations = in_flight * stage_layers * per_layer * tokens
    memory = {
        "weights": 2.0 * params,
        "gradients": 4.0 * params,
        "optimizer": opt_dense + opt_experts,
        "activations": float(activations),
    }
    memory["total"] = sum(memory.values())

    # every micro-batch passes each rank once (DualPipe feeds half from each end), twice with two stages per rank
    step = lay.micro_batches * 3.0 * sched.passes_per_rank  # F + B per pass
    return TrainPlan(
        layout=lay,
        counts=counts,
        stages=stages,
        layers_per_stage=per_stage,
        rank_params={"non_expert": int(dense), "experts": int(experts)},
        memory=memory,
        in_flight=float(in_flight),
        bubble_formula=f"{sched.bubble_formula} with PP={stages}",
        bubble=sched.bubble(stages),
        step=step,
    )
