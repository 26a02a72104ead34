"""The data and task functions every forkref benchmark measures.

``forkref bench`` and the scripts under ``benchmarks/`` import these, so the
command line measures exactly what the benchmarks measure: the same frame,
the same list of dicts, the same slice sums, the same trivial function.

Task functions live at module level in a module that imports neither numpy
nor pandas: spawn workers (and Ray's) import them by name, cheaply.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "TASKS",
    "build_dicts",
    "build_frame",
    "late_frame",
    "parse_size",
    "result_block",
    "trivial",
    "work",
]

#: Tasks per map: each sums a 1/TASKS slice of the data.
TASKS = 16

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Parse ``"1GiB"``, ``"512M"``, ``"64mb"`` or ``"1048576"`` into bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ValueError(
            f"cannot read size {text!r}: use a number with an optional unit, e.g. 1GiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def build_frame(nbytes: int, columns: int = 8, seed: int = 0) -> Any:
    """A DataFrame of ``columns`` random float64 columns taking about ``nbytes`` bytes."""
    import numpy as np
    import pandas as pd

    rows = max(1, nbytes // (8 * columns))
    rng = np.random.default_rng(seed)
    return pd.DataFrame({f"c{i}": rng.random(rows) for i in range(columns)})


def late_frame(base: Any, iteration: int) -> Any:
    """A new frame for one iteration of the late-object loop: ``base`` shifted by ``iteration``.

    A fresh object of the same size every time (the workers have never seen
    it), made by one vectorised add rather than by drawing random numbers again.
    """
    return base + float(iteration)


def build_dicts(n: int) -> list[dict[str, Any]]:
    """``n`` small dicts: the shape of records loaded from JSON or a database."""
    return [{"id": i, "value": float(i), "tag": "abc"} for i in range(n)]


def work(data: Any, i: int) -> float:
    """Sum a 1/TASKS slice of the rows: real work that touches the data."""
    if isinstance(data, list):
        part = data[i * len(data) // TASKS : (i + 1) * len(data) // TASKS]
        return float(sum(d["value"] for d in part))
    n = len(data)
    return float(data.iloc[i * n // TASKS : (i + 1) * n // TASKS].to_numpy().sum())


def trivial(x: int) -> int:
    """The smallest task: what a pool's own per-task overhead is measured with."""
    return x + 1


def result_block(part: int, nbytes: int) -> Any:
    """The ``part``-th big result: ``nbytes`` of float64, cheap to compute and to check."""
    import numpy as np

    return np.arange(nbytes // 8, dtype=np.float64) + part
