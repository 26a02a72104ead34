"""``forkref demo``: the same map over a big DataFrame, pickled versus shared.

Builds a DataFrame of the requested size, then maps one function over it on a
stdlib fork ``multiprocessing.Pool`` twice: once passing the frame as a plain
argument (pickled for every task), once passing ``forkref.share(frame)``. Each
task reports its worker's USS and PSS (psutil) while it still holds the frame,
so the table shows what a worker really pays.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from forkref._fork.hygiene import fork_hygiene
from forkref._share.handle import share
from forkref._tools.bench.data import build_frame, parse_size

__all__ = ["DemoRow", "build_frame", "parse_size", "run_demo"]


@dataclass(frozen=True)
class DemoRow:
    """One way of passing the frame, measured.

    Attributes:
        mode: how the frame reached the workers.
        seconds: wall time of the whole map, pool start included.
        worker_uss: per worker pid, the largest USS a task saw (bytes private to it).
        worker_pss: per worker pid, the largest PSS a task saw (private plus its share of shared).
    """

    mode: str
    seconds: float
    worker_uss: dict[int, int]
    worker_pss: dict[int, int]


def _task(df: Any, part: int, parts: int) -> tuple[int, float, int, int]:
    """Sum one slice of rows; report this worker's memory while it holds the frame."""
    rows = len(df)
    lo, hi = rows * part // parts, rows * (part + 1) // parts
    total = float(df.iloc[lo:hi].to_numpy().sum())
    mem = psutil.Process().memory_full_info()
    return psutil.Process().pid, total, mem.uss, mem.pss


def _run(mode: str, arg: Any, workers: int, tasks: int, hygiene: bool) -> tuple[DemoRow, float]:
    jobs = [(arg, i, tasks) for i in range(tasks)]
    start = time.perf_counter()
    if hygiene:
        with fork_hygiene(), mp.get_context("fork").Pool(workers) as pool:
            results = pool.starmap(_task, jobs, chunksize=1)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.starmap(_task, jobs, chunksize=1)
    seconds = time.perf_counter() - start
    uss: dict[int, int] = {}
    pss: dict[int, int] = {}
    for pid, _, task_uss, task_pss in results:
        uss[pid] = max(uss.get(pid, 0), task_uss)
        pss[pid] = max(pss.get(pid, 0), task_pss)
    return DemoRow(mode, seconds, uss, pss), sum(r[1] for r in results)


def run_demo(
    size: int, workers: int, tasks: int, echo: Callable[[str], None] = print
) -> list[DemoRow]:
    """Run both modes on one frame and print the comparison table."""
    echo(f"building a {size / 2**30:.2f} GiB DataFrame ...")
    df = build_frame(size)
    nbytes = int(df.memory_usage(index=True).sum())
    echo(f"mapping {tasks} tasks over it on {workers} fork workers, two ways\n")
    rows: list[DemoRow] = []
    totals = []
    for mode, arg, hygiene in (
        ("pickled argument", df, False),
        ("forkref.share()", share(df), True),
    ):
        row, total = _run(mode, arg, workers, tasks, hygiene)
        rows.append(row)
        totals.append(total)
    if abs(totals[0] - totals[1]) > 1e-6 * max(1.0, abs(totals[0])):
        raise RuntimeError(f"the two modes disagree: {totals[0]} != {totals[1]}")
    echo(format_table(rows, nbytes))
    return rows


def format_table(rows: list[DemoRow], nbytes: int) -> str:
    """The comparison as a fixed-width text table, with the speed-up."""
    mib = 2**20
    lines = [
        f"frame: {nbytes / mib:,.0f} MiB",
        f"{'mode':<18} {'wall s':>8} {'per-worker USS MiB':>22} {'per-worker PSS MiB':>22}",
    ]
    for row in rows:
        uss = " ".join(f"{v / mib:,.0f}" for v in row.worker_uss.values())
        pss = " ".join(f"{v / mib:,.0f}" for v in row.worker_pss.values())
        lines.append(f"{row.mode:<18} {row.seconds:>8.2f} {uss:>22} {pss:>22}")
    if len(rows) == 2 and rows[1].seconds > 0:
        lines.append(f"\nshare() is {rows[0].seconds / rows[1].seconds:,.1f}x faster than pickling")
    return "\n".join(lines)
