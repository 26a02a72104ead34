"""The bench's workloads: the same data and tasks as ``benchmarks/``.

``frame`` and ``dicts`` are ``benchmarks/bench_pools.py``'s scenario 1 (16
tasks, each summing a 1/16 slice), ``late`` its scenario 3 (a new frame per
iteration), ``tiny`` its scenario 2 (trivial tasks, pools already started);
``result`` is ``benchmarks/bench_shm.py``'s big result coming back.
"""

from __future__ import annotations

import math
from typing import Any

from forkref._tools.bench.data import (
    TASKS,
    build_dicts,
    build_frame,
    late_frame,
    result_block,
    trivial,
    work,
)
from forkref._tools.bench.registry import WORKLOADS, Config, Workload

__all__ = ["RESULT_TASKS", "size_text"]

#: Tasks of the result workload, each returning ``result_size / RESULT_TASKS`` bytes.
RESULT_TASKS = 4


def size_text(nbytes: int) -> str:
    """``1.00 GiB``, ``256 MiB``, ``64 KiB``."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.0f} MiB"
    return f"{nbytes / 2**10:.0f} KiB"


def _differs(got: float, want: float) -> bool:
    # Same function, same data, same order: sums agree to the last bit;
    # the tolerance only forgives a library summing in another order.
    return not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


def _check_sums(
    expected: list[float], answer: Any, tasks_run: int, where: str = ""
) -> tuple[str | None, set[int]]:
    """Compare ``[(pid, sum), ...]`` with the first ``tasks_run`` serial sums."""
    pairs = list(answer)
    pids = {pid for pid, _ in pairs}
    if len(pairs) != tasks_run:
        return f"{where}{len(pairs)} results for {tasks_run} tasks", pids
    for i, ((_, got), want) in enumerate(zip(pairs, expected, strict=False)):
        if _differs(got, want):
            return f"{where}task {i}: got {got!r}, expected {want!r}", pids
    return None, pids


def _serial_sums(data: Any, cfg: Config) -> list[float]:
    return [work(data, i) for i in range(TASKS)]


def _check_big(
    data: Any, expected: Any, answer: Any, cfg: Config, tasks_run: int
) -> tuple[str | None, set[int]]:
    return _check_sums(expected, answer, tasks_run)


WORKLOADS["frame"] = Workload(
    name="frame",
    title=lambda cfg: f"a {size_text(cfg.size)} DataFrame, {TASKS} tasks each summing a slice",
    tasks=lambda cfg: TASKS,
    build=lambda cfg: build_frame(cfg.size),
    serial=_serial_sums,
    check=_check_big,
)

WORKLOADS["dicts"] = Workload(
    name="dicts",
    title=lambda cfg: f"a list of {cfg.items:,} small dicts, {TASKS} tasks each summing a slice",
    tasks=lambda cfg: TASKS,
    build=lambda cfg: build_dicts(cfg.items),
    serial=_serial_sums,
    check=_check_big,
)


def _serial_late(base: Any, cfg: Config) -> list[list[float]]:
    sums = []
    for k in range(cfg.late_iters):
        frame = late_frame(base, k)
        sums.append([work(frame, i) for i in range(TASKS)])
        del frame
    return sums


def _check_late(
    data: Any, expected: Any, answer: Any, cfg: Config, tasks_run: int
) -> tuple[str | None, set[int]]:
    rounds = list(answer)
    if len(rounds) != cfg.late_iters:
        return f"{len(rounds)} iterations for {cfg.late_iters}", set()
    pids: set[int] = set()
    for k, (got, want) in enumerate(zip(rounds, expected, strict=True)):
        problem, seen = _check_sums(want, got, tasks_run, f"iteration {k}, ")
        pids |= seen
        if problem:
            return problem, pids
    return None, pids


WORKLOADS["late"] = Workload(
    name="late",
    title=lambda cfg: (
        f"late objects: a new {size_text(cfg.size)} DataFrame in each of "
        f"{cfg.late_iters} iterations, {TASKS} tasks each"
    ),
    tasks=lambda cfg: TASKS,
    build=lambda cfg: build_frame(cfg.size),
    serial=_serial_late,
    check=_check_late,
)


def _result_bytes(cfg: Config) -> int:
    return max(8, cfg.result_size // RESULT_TASKS)


def _check_results(
    data: Any, expected: Any, answer: Any, cfg: Config, tasks_run: int
) -> tuple[str | None, set[int]]:
    import numpy as np

    pairs = list(answer)
    pids = {pid for pid, _ in pairs}
    if len(pairs) != tasks_run:
        return f"{len(pairs)} results for {tasks_run} tasks", pids
    for i, (_, got) in enumerate(pairs):
        want = result_block(i, _result_bytes(cfg))  # the serial computation, redone here
        if not (isinstance(got, np.ndarray) and np.array_equal(got, want)):
            return f"result {i} differs from the serial computation", pids
    return None, pids


WORKLOADS["result"] = Workload(
    name="result",
    title=lambda cfg: (
        f"big results: {RESULT_TASKS} tasks each returning a "
        f"{size_text(_result_bytes(cfg))} array"
    ),
    tasks=lambda cfg: RESULT_TASKS,
    build=_result_bytes,
    serial=lambda data, cfg: None,
    check=_check_results,
    scalable=False,
)


def _check_tiny(
    data: Any, expected: Any, answer: Any, cfg: Config, tasks_run: int
) -> tuple[str | None, set[int]]:
    got = list(answer)
    if got != expected:
        if len(got) != len(expected):
            return f"{len(got)} results for {len(expected)} tasks", set()
        first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        return f"task {first}: got {got[first]!r}, expected {expected[first]!r}", set()
    return None, set()


WORKLOADS["tiny"] = Workload(
    name="tiny",
    title=lambda cfg: f"{cfg.tiny:,} trivial tasks, pools already started (map only)",
    tasks=lambda cfg: cfg.tiny,
    build=lambda cfg: range(cfg.tiny),
    serial=lambda data, cfg: [trivial(x) for x in data],
    check=_check_tiny,
    scalable=False,
    memory=False,
)
