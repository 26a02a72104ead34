"""How fork-based sharing scales with the heap: 1 to 16 GiB, share() vs the global-variable trick.

Two heaps, each size built once in a fresh process (then both ways run on
it, the global trick first), so sizes do not disturb each other:

* ``arrays``: a pandas DataFrame of float64 columns (numpy buffers: few big
  allocations, no Python object per value);
* ``objects``: a list of small dicts (millions of Python objects, each with a
  reference count and a gc header inside the pages fork shares).

Two ways to hand the heap to 2 fork workers, each doing a small task that
reads a sample of it (the point is the cost of forking, not of the work):

* ``global``: the heap in a module global, then ``multiprocessing`` fork
  ``Pool(2)`` and ``map`` (the trick people use to avoid pickling);
* ``share``: ``forkref.share(heap)`` and ``forkref.Pool(2).map`` with the
  handle as the argument (forkref forks lazily, inside the map).

Per run: the raw ``os.fork()`` time in the process holding the heap (what
every worker start costs, least of 5), the whole time from pool creation
to the map's results (the lesser of 2), and each worker's page-table size (``VmPTE`` in
``/proc/<pid>/status``) and USS (psutil) right after its task.

    python benchmarks/bench_scale.py              # 1, 2, 4, 8, 16 GiB where memory allows
    python benchmarks/bench_scale.py --max 4GiB   # stop at 4 GiB

A size is skipped when the machine's available memory is below 1.5x the
heap + 2 GiB (a shared machine: other work needs room too). Times are from
one run per point; the slopes (seconds and page-table bytes per GiB of heap)
are least squares over the sizes run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil

GiB = 1 << 30
_HEAP: Any = None  # the global-variable trick's global
_SAMPLE = 1000
HEAPS = ("arrays", "objects")
METHODS = ("global", "share")


# -- heaps and the task --------------------------------------------------------------


def build(kind: str, nbytes: int) -> Any:
    """A heap of about ``nbytes``: float64 columns, or a list of small dicts."""
    if kind == "arrays":
        import numpy as np
        import pandas as pd

        rows = nbytes // (8 * 8)
        # arange touches every page (np.empty would leave them unallocated).
        return pd.DataFrame({f"c{i}": np.arange(rows, dtype=np.float64) for i in range(8)})
    # ~210 bytes a record on 3.11 (dict 184 + float 24; the tag string is shared).
    n = nbytes // 210
    return [{"id": i, "value": float(i), "tag": "abc"} for i in range(n)]


def read_sample(heap: Any) -> float:
    """Read ``_SAMPLE`` spread-out items: the heap is used, few pages are touched."""
    if isinstance(heap, list):
        step = max(1, len(heap) // _SAMPLE)
        return float(sum(heap[i]["value"] for i in range(0, len(heap), step)))
    step = max(1, len(heap) // _SAMPLE)
    return float(heap.iloc[::step].to_numpy().sum())


def _task_global(_: int) -> tuple[int, float]:
    return os.getpid(), read_sample(_HEAP)


def _task_shared(heap: Any) -> tuple[int, float]:
    return os.getpid(), read_sample(heap)  # the handle arrives as the object itself


# -- one point, in a fresh process ----------------------------------------------------


def _worker_memory(pids: set[int]) -> list[dict[str, int]]:
    out = []
    for pid in sorted(pids):
        pte = 0
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmPTE:"):
                    pte = int(line.split()[1]) * 1024
        out.append({"pte": pte, "uss": psutil.Process(pid).memory_full_info().uss})
    return out


def _raw_fork_seconds() -> float:
    # The least disturbed of 5: on a shared machine a fork can wait for a CPU.
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        times.append(time.perf_counter() - t0)
        os.waitpid(pid, 0)
    return min(times)


def _map_global(heap: Any) -> tuple[float, list[dict[str, int]]]:
    global _HEAP
    _HEAP = heap
    t0 = time.perf_counter()
    pool = mp.get_context("fork").Pool(2)
    results = pool.map(_task_global, range(2), chunksize=1)
    whole = time.perf_counter() - t0
    memory = _worker_memory({p.pid for p in pool._pool})  # type: ignore[attr-defined]
    pool.terminate()
    pool.join()
    assert len(results) == 2
    return whole, memory


def _map_share(heap: Any) -> tuple[float, list[dict[str, int]]]:
    import forkref

    t0 = time.perf_counter()
    handle = forkref.share(heap)
    pool = forkref.Pool(2)
    results = pool.map(_task_shared, [handle, handle], chunksize=1)
    whole = time.perf_counter() - t0
    me = psutil.Process()
    workers = {c.pid for c in me.children(recursive=True) if c.cmdline() == me.cmdline()}
    memory = _worker_memory(workers)
    pool.terminate()
    pool.join()
    assert len(results) == 2
    return whole, memory


def run_point(kind: str, nbytes: int) -> list[dict[str, Any]]:
    """Build the heap here, then for each method fork and map once; its figures."""
    before = psutil.Process().memory_full_info().uss
    t0 = time.perf_counter()
    heap = build(kind, nbytes)
    built = time.perf_counter() - t0
    heap_bytes = psutil.Process().memory_full_info().uss - before
    rows = []
    for method, run in (("global", _map_global), ("share", _map_share)):
        fork_s = _raw_fork_seconds()
        (whole, memory), (again, _) = run(heap), run(heap)
        whole = min(whole, again)  # the quieter of two whole maps
        rows.append(
            {
                "heap": kind,
                "target_bytes": nbytes,
                "heap_bytes": heap_bytes,
                "method": method,
                "build_s": built,
                "fork_s": fork_s,
                "map_s": whole,
                "workers": memory,
            }
        )
    return rows


# -- the driver --------------------------------------------------------------------------


def _available() -> int:
    return int(psutil.virtual_memory().available)


def _point_in_child(kind: str, nbytes: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--point", kind, str(nbytes)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {nbytes} failed:\n{out.stderr}")
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    xs, ys = zip(*points, strict=True)
    return float(statistics.linear_regression(xs, ys).slope)


def _row(r: dict[str, Any]) -> str:
    w = r["workers"]
    pte = "/".join(f"{m['pte'] / 2**20:.1f}" for m in w)
    uss = "/".join(f"{m['uss'] / 2**20:.0f}" for m in w)
    return (
        f"{r['heap']:<8} {r['target_bytes'] / GiB:>5.0f} {r['heap_bytes'] / GiB:>8.2f} "
        f"{r['method']:<7} {r['build_s']:>8.2f} {r['fork_s'] * 1e3:>9.1f} {r['map_s']:>8.3f} "
        f"{pte:>13} {uss:>11}"
    )


def _slopes(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", "Slopes per GiB of heap (least squares over the sizes above):"]
    for kind in HEAPS:
        for method in METHODS:
            sel = [r for r in rows if r["heap"] == kind and r["method"] == method]
            if not sel:
                continue
            gib = [r["heap_bytes"] / GiB for r in sel]
            fork = _slope([(g, r["fork_s"] * 1e3) for g, r in zip(gib, sel, strict=True)])
            whole = _slope([(g, r["map_s"]) for g, r in zip(gib, sel, strict=True)])
            pte = _slope(
                [
                    (g, max(m["pte"] for m in r["workers"]) / 2**20)
                    for g, r in zip(gib, sel, strict=True)
                ]
            )
            out.append(
                f"  {kind:<8} {method:<7} fork {fork:6.2f} ms/GiB   map {whole:6.3f} s/GiB   "
                f"page tables {pte:5.2f} MiB/GiB per worker"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max", default="16GiB", help="largest heap (default 16GiB)")
    parser.add_argument("--heaps", default=",".join(HEAPS), help="arrays,objects")
    parser.add_argument("--json", help="also write every point to this file")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        kind, nbytes = args.point
        print(json.dumps(run_point(kind, int(nbytes))), flush=True)
        os._exit(0)  # freeing a 16 GiB heap object by object takes longer than the run
    from forkref._tools.bench.data import parse_size
    from forkref._tools.doctor import machine

    largest = parse_size(args.max)
    m = machine()
    print(
        f"Heap scaling, 2 fork workers; python {sys.version.split()[0]}, {m['cores']} cores, "
        f"{m['memory_bytes'] / GiB:.0f} GiB; a shared machine: single runs, read the slopes"
    )
    print(
        f"{'heap':<8} {'GiB':>5} {'real GiB':>8} {'method':<7} {'build s':>8} "
        f"{'fork ms':>9} {'map s':>8} {'VmPTE MiB':>13} {'USS MiB':>11}"
    )
    rows = []
    for kind in args.heaps.split(","):
        size = GiB
        while size <= largest:
            if _available() < 1.5 * size + 2 * GiB:
                print(
                    f"{kind:<8} {size / GiB:>5.0f}  skipped: {_available() / GiB:.1f} GiB available"
                )
                break
            for row in _point_in_child(kind, size):
                rows.append(row)
                print(_row(row), flush=True)
            size *= 2
    print("\n".join(_slopes(rows)))
    print(
        "fork ms: one os.fork() in the process holding the heap (least of 5). map s: pool "
        "creation (stdlib) or share() + pool (forkref) through both results (lesser of 2). "
        "VmPTE, USS: each worker after its task."
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
