"""Timing helpers shared by the plugins' own micro-benchmarks (plugins/*/bench/)."""
from __future__ import annotations

import time
from collections.abc import Callable


def best_of(runs: int, variants: dict[str, Callable[[], None]]) -> dict[str, float]:
    """The best time of each variant, run in turns so that load on the machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(found) for name, found in times.items()}
