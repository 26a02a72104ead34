"""Shared-memory transport benchmark: one run, peers side by side on the same data.

Part 1: a DataFrame (default 1 GiB) reaching 2 *spawn* workers, end to end:
from the moment the parent starts handing it over until both workers hold a
usable DataFrame (a barrier in the workers makes "both" exact). Peers:

* ``forkref.share`` - the handle is pickled per task (~150 bytes); the parent
  serializes the object once into a segment, each worker maps it zero-copy;
* hand-written ``multiprocessing.shared_memory`` - copy the values into a
  segment, send its name, attach, wrap in a DataFrame without copying;
* ``ray.put`` + two tasks (after ``ray.init``), if ray is installed;
* the plain argument - pickled for every task (what the stdlib does);
* a plain ``memcpy`` of the same bytes into fresh memory, for scale.

After the timed part each worker touches every value, waits for the other,
and reports its USS and PSS (psutil): memory private to it vs its fair share.

Part 2: a 256 MiB array result coming back from a spawn worker: through the
stdlib pipe (pickled) vs ``forkref.export_result``/``import_result``.

Run: ``python benchmarks/bench_shm.py`` (``--size 256MiB`` for a quick run,
``--no-ray`` to skip ray). Times are the best of ``--rounds`` rounds; the
machine is shared, so look at the ratios.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pandas as pd
import psutil

import forkref
from forkref._tools.bench.data import parse_size

GiB = 1 << 30
MiB = 1 << 20
_barrier: Any = None


@dataclass
class Reached:
    """What a worker reports: when it held the object, and its memory after touching it."""

    at: float
    rows: int
    uss: int
    pss: int


# -- worker side ----------------------------------------------------------------


def _init(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def _warm(_: int) -> int:
    _barrier.wait()  # both workers are up and have imported pandas
    return os.getpid()


def _report(df: pd.DataFrame) -> Reached:
    _barrier.wait()  # both workers hold the DataFrame now
    at = time.time()
    rows = len(df)
    float(df.to_numpy(copy=False).sum())  # touch every page
    _barrier.wait()  # both have touched it: shared pages are shared by two
    mem = psutil.Process().memory_full_info()
    return Reached(at, rows, mem.uss, mem.pss)


def reach_forkref(df: pd.DataFrame) -> Reached:
    return _report(df)  # the handle resolved while the task was unpickled


def reach_plain(df: pd.DataFrame) -> Reached:
    return _report(df)


def reach_shm(spec: tuple[str, tuple[int, int], str, list[Any]]) -> Reached:
    name, shape, dtype, columns = spec
    kwargs: dict[str, Any] = {"track": False} if sys.version_info >= (3, 13) else {}
    seg = shared_memory.SharedMemory(name=name, **kwargs)
    values = np.ndarray(shape, dtype=dtype, buffer=seg.buf)
    df = pd.DataFrame(values, columns=columns, copy=False)
    result = _report(df)
    del df, values
    seg.close()
    return result


def make_result(nbytes: int, export: bool) -> tuple[float, Any]:
    """Build an array result; return its build time and the result to send back."""
    start = time.perf_counter()
    arr = np.ones(nbytes // 8)
    built = time.perf_counter() - start
    return built, forkref.export_result(arr) if export else arr


# -- parent side ----------------------------------------------------------------


def _pool(ctx: Any) -> Any:
    pool = ctx.Pool(2, initializer=_init, initargs=(ctx.Barrier(2),))
    pool.map(_warm, [0, 1], chunksize=1)
    return pool


def _deliver(
    ctx: Any, fn: Callable[[Any], Reached], make_arg: Callable[[], Any]
) -> tuple[float, list[Reached]]:
    pool = _pool(ctx)
    try:
        start = time.time()
        arg = make_arg()
        reached = pool.map(fn, [arg, arg], chunksize=1)
        return max(r.at for r in reached) - start, reached
    finally:
        pool.terminate()
        pool.join()


def run_forkref(ctx: Any, df: pd.DataFrame) -> tuple[float, list[Reached]]:
    handles: list[Any] = []

    def make() -> Any:
        handles.append(forkref.share(df))
        return handles[-1]

    try:
        return _deliver(ctx, reach_forkref, make)
    finally:
        for h in handles:
            h.release()


def run_plain(ctx: Any, df: pd.DataFrame) -> tuple[float, list[Reached]]:
    return _deliver(ctx, reach_plain, lambda: df)


def run_shm(ctx: Any, df: pd.DataFrame) -> tuple[float, list[Reached]]:
    segs: list[shared_memory.SharedMemory] = []

    def make() -> Any:
        values = df.to_numpy(copy=False)
        seg = shared_memory.SharedMemory(create=True, size=values.nbytes)
        segs.append(seg)
        np.ndarray(values.shape, values.dtype, buffer=seg.buf)[:] = values
        return (seg.name, values.shape, values.dtype.str, list(df.columns))

    try:
        return _deliver(ctx, reach_shm, make)
    finally:
        for seg in segs:
            seg.close()
            seg.unlink()


def run_memcpy(df: pd.DataFrame) -> float:
    values = df.to_numpy(copy=False)
    start = time.perf_counter()
    out = np.empty_like(values)
    np.copyto(out, values)
    return time.perf_counter() - start


def run_ray(df: pd.DataFrame, rounds: int) -> list[tuple[float, list[Reached]]] | str:
    try:
        import ray
    except ImportError:
        return "ray is not installed (pip install ray)"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def reach(frame: pd.DataFrame) -> Reached:
            at = time.time()
            rows = len(frame)
            float(frame.to_numpy(copy=False).sum())
            mem = psutil.Process().memory_full_info()
            return Reached(at, rows, mem.uss, mem.pss)

        ray.get([reach.remote(df.iloc[:10]) for _ in range(2)])  # warm both workers
        runs = []
        for _ in range(rounds):
            start = time.time()
            ref = ray.put(df)
            reached = ray.get([reach.remote(ref), reach.remote(ref)])
            runs.append((max(r.at for r in reached) - start, reached))
            del ref
        return runs
    finally:
        ray.shutdown()


def run_results(ctx: Any, nbytes: int, rounds: int) -> dict[str, float]:
    """Best time for a result of ``nbytes`` to come back, by pipe and by segment."""
    best = {"pipe": float("inf"), "segment": float("inf")}
    best_read = dict(best)
    with ctx.Pool(1) as pool:
        pool.apply(make_result, (MiB, False))  # warm
        for _ in range(rounds):
            for way in ("pipe", "segment"):
                gc.collect()
                start = time.perf_counter()
                built, value = pool.apply(make_result, (nbytes, way == "segment"))
                arr = forkref.import_result(value)
                took = time.perf_counter() - start - built
                arr.sum()  # the parent reads it all
                read = time.perf_counter() - start - built
                best[way] = min(best[way], took)
                best_read[way] = min(best_read[way], read)
                del arr, value
    return {
        "pipe": best["pipe"],
        "segment": best["segment"],
        "pipe+read": best_read["pipe"],
        "segment+read": best_read["segment"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB, help="DataFrame size (1GiB)")
    parser.add_argument("--result-size", type=parse_size, default=256 * MiB)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip ray even if installed")
    parser.add_argument("--no-plain", action="store_true", help="skip the pickled argument")
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    rows = args.size // (8 * 8)
    df = pd.DataFrame(np.random.default_rng(0).random((rows, 8)), columns=list("abcdefgh"))
    nbytes = int(df.memory_usage(index=False).sum())
    gb = nbytes / 1e9
    print(
        f"Part 1: a {nbytes / GiB:.2f} GiB DataFrame reaching 2 spawn workers "
        f"(best of {args.rounds}; python {sys.version.split()[0]}, {os.cpu_count()} cpus)"
    )

    table: dict[str, list[tuple[float, list[Reached]]] | str] = {}
    memcpy = [run_memcpy(df) for _ in range(args.rounds)]
    table["forkref.share (shared memory)"] = [run_forkref(ctx, df) for _ in range(args.rounds)]
    table["hand-written SharedMemory"] = [run_shm(ctx, df) for _ in range(args.rounds)]
    table["ray.put (after ray.init)"] = (
        "skipped (--no-ray)" if args.no_ray else run_ray(df, args.rounds)
    )
    if not args.no_plain:  # one round: it takes a while
        table["plain argument (pickled per task)"] = [run_plain(ctx, df)]

    ours = table["forkref.share (shared memory)"]
    assert not isinstance(ours, str)
    our_best = min(took for took, _ in ours)
    head = ("first s", 8), ("best s", 7), ("GB/s", 6), ("vs forkref", 10), ("USS MiB", 10)
    print(f"{'peer (2 spawn workers)':35}", *(f"{t:>{w}}" for t, w in head), f"{'PSS MiB':>10}")
    print(
        f"{'plain memcpy of the same bytes':35} {memcpy[0]:8.3f} {min(memcpy):7.3f} "
        f"{gb / min(memcpy):6.2f} {min(memcpy) / our_best:9.2f}x {'-':>10} {'-':>10}"
    )
    for name, runs in table.items():
        if isinstance(runs, str):
            print(f"{name:35} {runs}")
            continue
        best, reached = min(runs, key=lambda r: r[0])
        assert all(r.rows == rows for _, rs in runs for r in rs)
        uss = "/".join(f"{r.uss / MiB:.0f}" for r in reached)
        pss = "/".join(f"{r.pss / MiB:.0f}" for r in reached)
        print(
            f"{name:35} {runs[0][0]:8.3f} {best:7.3f} {gb / best:6.2f} "
            f"{best / our_best:9.2f}x {uss:>10} {pss:>10}"
        )
    print("'vs forkref': that peer's best time / forkref's best (above 1: forkref is faster).")
    print("USS/PSS: each worker after touching every value (psutil).")

    del df
    gc.collect()
    res = run_results(ctx, args.result_size, args.rounds)
    print(
        f"\nPart 2: a {args.result_size / MiB:.0f} MiB array result back from a spawn worker "
        f"(best of {args.rounds}, excluding building it)"
    )
    print(
        f"  through the stdlib pipe (pickled): {res['pipe']:.3f} s; "
        f"with the parent reading it all: {res['pipe+read']:.3f} s"
    )
    print(
        f"  export_result/import_result:       {res['segment']:.3f} s; "
        f"with the parent reading it all: {res['segment+read']:.3f} s"
    )
    print(
        f"  ratio pipe/segment: {res['pipe'] / res['segment']:.1f}x "
        f"(including the read: {res['pipe+read'] / res['segment+read']:.1f}x)"
    )


if __name__ == "__main__":
    main()
