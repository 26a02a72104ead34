"""share() on the stdlib fork Pool vs pickling the argument vs the global-variable trick.

One process, the same DataFrame for every contender, 16 tasks on 2 workers:

* ``pickled``  the frame is a plain task argument: pickled for every task;
* ``global``   the frame is set as a module global before the pool forks
               (the classic hand-made trick, the best case);
* ``share``    ``forkref.share(frame)`` is the task argument.

Every contender makes the same ``starmap`` call with the same argument shape
(the global trick passes ``None`` where the others pass the frame). Two
workloads: ``light`` reads the frame's shape, so its per-task figure is the
cost of getting the frame to the worker; ``sum`` sums a 1/16 slice of the
rows, a real task whose work grows with the frame. For each frame size (1 MiB
to 1 GiB by default) it times the pool start (the fork) and the map, best of
several rounds, and reports per-task cost and the ratios share/global and
pickled/share on the total (fork + map).

Run: ``python benchmarks/bench_core.py [--sizes 1MiB,16MiB,256MiB,1GiB] [--json out.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import forkref
from forkref._tools.bench.data import TASKS, build_frame, parse_size, work

WORKERS = 2
_GLOBAL: Any = None


def light(df: Any, part: int) -> float:
    return float(df.shape[0] + part)


def slice_sum(df: Any, part: int) -> float:
    return work(df, part)  # the same task as forkref bench's frame workload


def light_global(_: None, part: int) -> float:
    return light(_GLOBAL, part)


def slice_sum_global(_: None, part: int) -> float:
    return slice_sum(_GLOBAL, part)


WORKLOADS = {"light": (light, light_global), "sum": (slice_sum, slice_sum_global)}


def _timed_map(mode: str, workload: str, df: Any) -> tuple[float, float, list[float]]:
    """(pool start seconds, map seconds, results) for one contender."""
    global _GLOBAL
    fork = mp.get_context("fork")
    handle = forkref.share(df) if mode == "share" else None
    if mode == "global":
        _GLOBAL = df
    gc.collect()
    t0 = time.perf_counter()
    pool = fork.Pool(WORKERS)
    pool.apply(abs, (0,))  # both workers are up before the map is timed
    t1 = time.perf_counter()
    fn, fn_global = WORKLOADS[workload]
    arg = {"global": None, "share": handle, "pickled": df}[mode]
    out = pool.starmap(fn_global if mode == "global" else fn, [(arg, i) for i in range(TASKS)], 1)
    t2 = time.perf_counter()
    pool.close()
    pool.join()
    _GLOBAL = None
    return t1 - t0, t2 - t1, out


def bench_size(size: int, workload: str, rounds: int, pickled_rounds: int) -> dict[str, Any]:
    df = build_frame(size)
    result: dict[str, Any] = {
        "size_bytes": int(df.memory_usage(index=True).sum()),
        "workload": workload,
    }
    expected = None
    for mode, n in (("global", rounds), ("share", rounds), ("pickled", pickled_rounds)):
        starts, maps = [], []
        for _ in range(n):
            start, mapped, out = _timed_map(mode, workload, df)
            expected = out if expected is None else expected
            assert out == expected, f"{mode} computed something else"
            starts.append(start)
            maps.append(mapped)
        result[mode] = {
            "start_s": statistics.median(starts),
            "map_s": min(maps),
            "total_s": min(s + m for s, m in zip(starts, maps, strict=True)),
        }
    return result


def report(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'workload':>8} {'size':>9} | {'per-task ms: pickled':>20} {'global':>8} {'share':>8} | "
        f"{'total s: global':>15} {'share':>7} | {'share/global':>12} {'pickled/share':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        per = {m: 1000 * r[m]["map_s"] / TASKS for m in ("pickled", "global", "share")}
        lines.append(
            f"{r['workload']:>8} {r['size_bytes'] / 2**20:>7.0f}Mi | "
            f"{per['pickled']:>20.2f} {per['global']:>8.2f} "
            f"{per['share']:>8.2f} | {r['global']['total_s']:>15.3f} {r['share']['total_s']:>7.3f}"
            f" | {r['share']['total_s'] / r['global']['total_s']:>12.2f}x"
            f" {r['pickled']['total_s'] / r['share']['total_s']:>12.0f}x"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1MiB,16MiB,256MiB,1GiB")
    parser.add_argument("--rounds", type=int, default=7, help="rounds for global and share")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    rows = []
    for workload in WORKLOADS:
        for text in args.sizes.split(","):
            size = parse_size(text)
            pickled_rounds = 1 if size >= 2**28 else 3
            print(f"{workload} {text}: ...", file=sys.stderr, flush=True)
            rows.append(bench_size(size, workload, args.rounds, pickled_rounds))
    print(
        f"{TASKS} tasks on {WORKERS} fork workers (stdlib multiprocessing.Pool), Python "
        f"{sys.version.split()[0]}; per-task = map time / {TASKS}; totals include the fork"
    )
    print(report(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
