"""Timing for the benchmarks: medians of interleaved repeats, and ratios only from plausible measurements.

These machines are noisy (2 shared cores): every comparison runs its candidates in alternation, several
rounds, and reports medians. A time that is not a positive, finite number of seconds (or is below what the
clock can resolve) is an error here, never a printed ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

__all__ = ["ImplausibleMeasurement", "StepClock", "checked", "interleaved", "ratio", "time_call"]

MIN_SECONDS = 1e-7  # below perf_counter's useful resolution for one timed batch of calls


class ImplausibleMeasurement(RuntimeError):
    """A measurement no ratio may be computed from (non-positive, non-finite, below clock resolution)."""


def checked(seconds: float, what: str) -> float:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= MIN_SECONDS):
        raise ImplausibleMeasurement(f"{what}: measured {seconds!r} s; refusing to report a figure from it.")
    return float(seconds)


def time_call(fn: Callable[[], object], min_time: float = 0.2, max_repeat: int = 50) -> float:
    """Seconds per call of ``fn``: repeated until ``min_time`` has passed (at least 3 calls)."""
    n, t0 = 0, time.perf_counter()
    while n < max_repeat and (n < 3 or time.perf_counter() - t0 < min_time):
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, **kw) -> dict[str, float]:
    """Median seconds per call of each function over ``rounds`` alternating rounds (after ``warmup`` calls
    each), checked for plausibility."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, **kw))
    return {name: checked(statistics.median(v), name) for name, v in samples.items()}


def ratio(numerator: float, denominator: float, what: str = "ratio") -> float:
    """``numerator / denominator`` of two checked measurements."""
    return checked(numerator, f"{what} (numerator)") / checked(denominator, f"{what} (denominator)")


class StepClock:
    """A ``generate(streamer=...)`` that only timestamps: ``generate`` calls ``put`` with the prompt, then once
    per new token, so consecutive timestamps after the first new token are the decode steps themselves
    (transformers only calls ``put``/``end``, so no base class is needed)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass
