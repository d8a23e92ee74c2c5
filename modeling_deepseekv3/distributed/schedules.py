"""The one vocabulary of pipeline schedules: what ``pretrain --pp-schedule`` runs and ``plan --train`` plans.

Each schedule says where its stages sit (``placement``), whether ``pretrain`` runs it (a
``torch.distributed.pipelining`` schedule; the others are planned on paper only), and the two figures the planner
needs: activations in flight and the bubble. Figures are in units of one *stage*: ``PP`` below is the number of
stages (``pp`` ranks, or ``2 pp`` for two stages per rank), ``F`` a stage's forward, ``B = 2F`` its backward,
``W = F`` the weight-gradient half of ``B``, ``F&B = F + B`` (no credit for overlap). Sources: DualPipe's README
table (1F1B, ZB1P, DualPipe, DualPipeV), the zero-bubble paper for ZB-V (the bubble of ZB1P over half-size
stages, the memory of 1F1B), Megatron's interleaved schedule (the 1F1B bubble divided by the chunks per rank),
torch's own warm-up counts for what interleaved 1F1B keeps in flight. Nothing here imports torch.

Placements: ``"single"`` one stage per rank; ``"v"`` two per rank in a V (rank r holds stages r and 2pp-1-r: the
first and the last stage share rank 0); ``"loop"`` two per rank, looped (r and r+pp); ``"bidirectional"``
DualPipe's two copies (rank r holds stages r and pp-1-r of a ``pp``-stage model, both directions: 2x parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_SCHEDULE", "RUNNABLE", "SCHEDULES", "Schedule", "schedule_named"]


F, B, W = 1.0, 2.0, 1.0  # a stage's forward, backward, and the weight-gradient part of the backward
FB = F + B  # an overlapped forward+backward pair, with no credit for the overlap


@dataclass(frozen=True)
class Schedule:
    name: str
    placement: str  # "single" | "v" | "loop" | "bidirectional" (module docstring)
    runs: bool  # pretrain runs it; False: plan --train only
    bubble_formula: str  # idle time per step, PP = stages
    _bubble: Callable[[int], float]  # the formula, of the stage count
    _in_flight: Callable[[int, int], float]  # stage micro-batches kept for backward, of (stages, micro-batches)

    def num_stages(self, pp: int) -> int:
        """Stages of a ``pp``-rank pipeline: DualPipe's two copies are one ``pp``-stage model run both ways."""
        return pp if self.placement in ("single", "bidirectional") else 2 * pp

    def stage_ids(self, pp: int, pp_rank: int) -> tuple[int, ...]:
        """The stages rank ``pp_rank`` holds."""
        if self.placement == "single":
            return (pp_rank,)
        if self.placement == "loop":
            return (pp_rank, pp_rank + pp)
        if self.placement == "bidirectional":
            return (pp_rank, pp - 1 - pp_rank)
        return (pp_rank, 2 * pp - 1 - pp_rank)

    def bubble(self, stages: int) -> float:
        """Idle time per step, in F units."""
        return self._bubble(stages)

    def in_flight(self, stages: int, micro_batches: int) -> float:
        """Stage micro-batches whose activations the busiest rank keeps for backward."""
        return self._in_flight(stages, micro_batches)

    @property
    def passes_per_rank(self) -> int:
        """Times each micro-batch crosses a rank per step: twice where a rank holds two stages of one model."""
        return 2 if self.placement in ("v", "loop") else 1


def _table(*schedules: Schedule) -> dict[str, Schedule]:
    return {s.name: s for s in schedules}


SCHEDULES = _table(
    Schedule(
        "dualpipev", "v", True, "(PP/2-1)(F&B+B-3W)", lambda pp: (pp / 2 - 1) * (FB + B - 3 * W), lambda pp, m: pp + 1
    ),
    Schedule("zbv", "v", True, "(PP/2-1)(F+B-2W)", lambda pp: (pp / 2 - 1) * (F + B - 2 * W), lambda pp, m: pp),
    Schedule("1f1b", "single", True, "(PP-1)(F+B)", lambda pp: (pp - 1) * (F + B), lambda pp, m: pp),
    # torch's warm-up on rank 0 is (v-1)pp + 2(pp-1) chunk forwards with v = 2 chunks per rank, + the one in progress
    Schedule(
        "interleaved1f1b", "loop", True, "(PP/2-1)(F+B)", lambda pp: (pp / 2 - 1) * (F + B), lambda pp, m: 1.5 * pp - 1
    ),
    Schedule(
        "gpipe", "single", True, "(PP-1)(F+B)", lambda pp: (pp - 1) * (F + B), lambda pp, m: m
    ),  # all forwards first
    Schedule("zb1p", "single", False, "(PP-1)(F+B-2W)", lambda pp: (pp - 1) * (F + B - 2 * W), lambda pp, m: pp),
    Schedule(
        "dualpipe",
        "bidirectional",
        False,
        "(PP/2-1)(F&B+B-3W)",
        lambda pp: (pp / 2 - 1) * (FB + B - 3 * W),
        lambda pp, m: pp + 1,
    ),
)
#: What ``pretrain --pp-schedule`` takes (torch.distributed.pipelining runs these).
RUNNABLE = tuple(name for name, s in SCHEDULES.items() if s.runs)
#: DeepSeek-V3's schedule, the default of both ``pretrain`` and ``plan --train``.
DEFAULT_SCHEDULE = "dualpipev"


def schedule_named(name: str, *, to_run: bool = False) -> Schedule:
    """The schedule called ``name``; ``ValueError`` naming the choices (only the runnable ones with ``to_run``)."""
    s = SCHEDULES.get(name)
    if s is None:
        raise ValueError(f"--pp-schedule {name}: choose one of {', '.join(RUNNABLE if to_run else SCHEDULES)}.")
    if to_run and not s.runs:
        raise ValueError(
            f"--pp-schedule {name} is planned on paper only (deepseek-v3 plan --train); pretrain runs "
            f"{', '.join(RUNNABLE)} (torch.distributed.pipelining has no {name})."
        )
    return s
