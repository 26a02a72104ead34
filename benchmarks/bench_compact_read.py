"""What one read of a compact list costs, and where the time goes.

Side by side, in one process, rounds interleaved: reading every item of
N annotation records (``c[i]`` for i in order, and ``for x in c``) from

* a plain list;
* compact() with one pickle per item (the layout compact() used before
  records were stored by column, and still uses for irregular items);
* compact() by column (what it does with records sharing their keys);
* detectron2's NumpySerializedList (as in ``bench_dataloader.py``).

Then the parts of a columnar read: one cell of each column kind, read alone.
Medians over rounds with [min-max], in ns per item; ratios to the plain list.

    python benchmarks/bench_compact_read.py              # 200k records, 7 rounds
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import forkref
from forkref._memory.columns import pickle_column
from forkref._memory.layout import ITEM, Layout

sys.path.insert(0, os.path.dirname(__file__))
from bench_dataloader import NumpySerializedList, records


def per_item_pickles(items: list[Any]) -> forkref.CompactList[Any]:
    column = pickle_column()
    for number, item in enumerate(items):
        column.add(item, f"item {number}")
    return forkref.CompactList._from_layout(Layout(ITEM, (), [column.finish()], len(items)))


def timed(fn: Callable[[], Any], n: int) -> float:
    # As timeit does: no gc pass inside the clock (the plain list's 200k
    # tracked records would make every pass slow, for every contender).
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) / n * 1e9
    finally:
        gc.enable()


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n = args.records
    plain = list(records(n))
    contenders = {
        "list": plain,
        "compact, one pickle per item": per_item_pickles(plain),
        "compact, by column": forkref.compact(plain),
        "numpy-serialized (detectron2)": NumpySerializedList(plain),
    }
    columnar = contenders["compact, by column"]
    assert all(columnar[i] == plain[i] for i in range(0, n, 997))
    layout = columnar._layout
    parts = {f"cell of a {c.kind} column": c.get for c in layout.columns}
    parts["whole record (generated reader)"] = layout.read
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, obj in contenders.items():
            results.setdefault(f"{name}: c[i]", []).append(
                timed(lambda obj=obj: [obj[i] for i in range(n)], n)
            )
            if name != "numpy-serialized (detectron2)":  # it has no __iter__ of its own
                results.setdefault(f"{name}: iterate", []).append(
                    timed(lambda obj=obj: [x for x in obj], n)
                )
        for name, get in parts.items():
            cells = timed(lambda g=get: list(map(g, range(n))), n)
            results.setdefault(f"  {name}", []).append(cells)
    print(
        f"bench_compact_read: {n} records {list(plain[0])}, {args.rounds} rounds interleaved; "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (a shared machine: absolute figures are noisy)"
    )
    print(f"columns: {[c.kind for c in layout.columns]}")
    print(f"{'read':<52} {'ns/item median [min-max]':>26} {'x list':>8}")
    base = {"c[i]": results["list: c[i]"], "iterate": results["list: iterate"]}
    for name, values in results.items():
        kind = name.rsplit(": ", 1)[-1]
        ratio = [v / b for v, b in zip(values, base[kind], strict=True)] if kind in base else None
        shown = f"{statistics.median(ratio):8.1f}" if ratio else ""
        print(f"{name:<52} {_spread(values):>26} {shown}")


if __name__ == "__main__":
    main()
