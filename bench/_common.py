"""Shared helpers for the benchmarks: timing, medians, one side-by-side table per run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], n: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def table(title: str, rows: list[tuple[str, list[float], str, list[float], str]]) -> None:
    """rows: (work, vmforge samples, standard tool, tool samples, target)."""
    print(f"\n{title}")
    head = f"| {'work':34} | {'vmforge (median)':>16} | {'standard tool':26} | " \
           f"{'tool (median)':>13} | {'tool/vmforge':>12} | {'target':18} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for work, ours, tool, theirs, target in rows:
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"| {work:34} | {fmt(mo):>16} | {tool:26} | {fmt(mt):>13} | "
              f"{mt / mo:>11.2f}x | {target:18} |")
