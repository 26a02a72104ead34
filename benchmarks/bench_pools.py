"""forkref.Pool against the hand-made and third-party ways of handing big data to workers.

One process, the same data for every contender, side by side, ratios printed:

1. **Big argument**: 16 tasks on 2 workers, each summing a 1/16 slice of
   (a) a DataFrame (1 GiB by default) and (b) a list of 2M small dicts.
   Contenders: the global-variable trick on a stdlib fork Pool (set a global,
   then create the pool: the best hand-made case), ``forkref.Pool`` with a
   ``forkref.share()`` handle, ``forkref.Pool(auto_share=True)`` with the plain
   object, mpire ``WorkerPool(shared_objects=...)`` (fork), and
   ``joblib.Parallel`` (loky, its default backend). Each time covers creating
   the pool, the map, and closing the pool.
2. **Trivial tasks**: 100k calls of a trivial function; ``forkref.Pool.map``
   vs ``multiprocessing.Pool.map`` (fork) with the same chunksize, pools
   already started (throughput of the map alone).
3. **Late objects**: each iteration builds a new DataFrame and maps over it:
   one long-lived ``forkref.Pool`` (a fresh generation per new object) vs a
   fresh stdlib fork Pool per iteration with the frame set as a global first.
   Time per iteration, frame construction excluded.
4. **The pickled path's memory**: a DataFrame (``--pickled-size``, 384 MiB)
   passed as a plain argument to 8 tasks, ``chunksize=1``, 2 workers,
   nothing shared (``share_threshold=None``): ``forkref.Pool`` vs
   ``multiprocessing.Pool``, each in a fresh interpreter; the parent's peak
   RSS (it holds the frame and the pickles in flight) and each worker's peak
   USS, sampled every 20 ms.
5. **imap throughput**: ``imap`` and ``imap_unordered`` over ``--imap-items``
   trivial items at ``chunksize=1``, pools already started.

Run: ``python benchmarks/bench_pools.py [--df-size 1GiB] [--dicts 2000000]
[--trivial 100000] [--chunksizes 1,100] [--late-iters 3] [--rounds 5]
[--only 1,2,3,4,5]``. Rounds interleave the contenders; ratios are given as
the median over rounds with their range (min-max).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import forkref
from forkref._tools.bench.data import (  # the data and tasks forkref bench measures too
    TASKS,
    build_dicts,
    build_frame,
    late_frame,
    parse_size,
    trivial,
    work,
)

GLOBAL = "global trick (stdlib fork Pool)"
SHARE = "forkref.Pool + share()"
AUTO = "forkref.Pool(auto_share=True)"
MPIRE = "mpire WorkerPool(shared_objects)"
JOBLIB = "joblib.Parallel (loky)"
WORKERS = 2
_GLOBAL: Any = None


# -- data and tasks ---------------------------------------------------------------


def work_global(_: None, i: int) -> float:
    return work(_GLOBAL, i)


def work_mpire(shared: Any, i: int) -> float:
    return work(shared, i)


# -- contenders for scenario 1 ---------------------------------------------------------


def run_global(data: Any) -> list[float]:
    global _GLOBAL
    _GLOBAL = data
    try:
        with mp.get_context("fork").Pool(WORKERS) as pool:
            return pool.starmap(work_global, [(None, i) for i in range(TASKS)])
    finally:
        _GLOBAL = None


def run_forkref_share(data: Any) -> list[float]:
    with forkref.share(data) as handle, forkref.Pool(WORKERS) as pool:
        return pool.starmap(work, [(handle, i) for i in range(TASKS)])


def run_forkref_auto(data: Any) -> list[float]:
    with forkref.Pool(WORKERS, auto_share=True) as pool:
        return pool.starmap(work, [(data, i) for i in range(TASKS)])


def run_mpire(data: Any) -> list[float]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=WORKERS, shared_objects=data, start_method="fork") as pool:
        return pool.map(work_mpire, [(i,) for i in range(TASKS)])  # type: ignore[no-any-return]


def run_joblib(data: Any) -> list[float]:
    from joblib import Parallel, delayed

    return Parallel(n_jobs=WORKERS)(delayed(work)(data, i) for i in range(TASKS))  # type: ignore[no-any-return]


def best_time(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def scenario_big(name: str, data: Any, rounds: int, joblib_rounds: int) -> dict[str, float]:
    contenders: list[tuple[str, Callable[[Any], Any], int]] = [
        (GLOBAL, run_global, rounds),
        (SHARE, run_forkref_share, rounds),
        (AUTO, run_forkref_auto, rounds),
        (MPIRE, run_mpire, rounds),
        (JOBLIB, run_joblib, joblib_rounds),
    ]
    print(f"\n== 1. {TASKS} tasks over {name} on {WORKERS} workers (pool start + map + close) ==")
    samples: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    expected = run_global(data)
    # Rounds interleave the contenders (A B C, A B C, ...): the box is shared and
    # noisy, and drift then hits every contender alike.
    for r in range(rounds):
        for label, fn, n in contenders:
            if r >= n:
                continue
            start = time.perf_counter()
            result = fn(data)
            samples[label].append(time.perf_counter() - start)
            assert result == expected, f"{label} computed something else"
    best = {label: min(v) for label, v in samples.items()}
    median = {label: statistics.median(v) for label, v in samples.items()}
    print(f"  {'':34s} {'best':>8s}   {'median':>8s}   ({rounds} rounds, joblib {joblib_rounds})")
    for label in samples:
        print(f"  {label:34s} {best[label]:8.3f} s {median[label]:8.3f} s")
    for text, a, b, target in (
        ("forkref(share)/global", SHARE, GLOBAL, "<= 1.10"),
        ("forkref(auto)/global", AUTO, GLOBAL, "<= 1.10"),
        ("mpire/forkref(share)", MPIRE, SHARE, "> 1"),
        ("joblib/forkref(share)", JOBLIB, SHARE, "> 1"),
    ):
        # Per-round ratios (the contenders of a round ran back to back): their
        # median and range say how far one run on this shared box can be trusted.
        per_round = [x / y for x, y in zip(samples[a], samples[b], strict=False)]
        print(
            f"  ratio {text:24s} median of rounds {statistics.median(per_round):5.2f}x "
            f"(range {min(per_round):.2f}-{max(per_round):.2f}x)   "
            f"best/best {best[a] / best[b]:5.2f}x   (target {target})"
        )
    return best


def scenario_trivial(n: int, chunksizes: list[int | None], rounds: int) -> None:
    print(f"\n== 2. {n} trivial tasks, pools already started (map only) ==")
    print(f"  ({rounds} interleaved rounds; throughput from the median and the best round)")
    items = range(n)
    stdlib = mp.get_context("fork").Pool(WORKERS)
    ours = forkref.Pool(WORKERS)
    try:
        stdlib.map(trivial, range(8))
        ours.map(trivial, range(8))
        for chunksize in chunksizes:
            t_std: list[float] = []
            t_ours: list[float] = []
            for _ in range(rounds):
                for pool, times in ((stdlib, t_std), (ours, t_ours)):
                    start = time.perf_counter()
                    result = pool.map(trivial, items, chunksize)
                    times.append(time.perf_counter() - start)
                    assert result[-1] == n
            label = "default" if chunksize is None else str(chunksize)
            med_std, med_ours = statistics.median(t_std), statistics.median(t_ours)
            print(
                f"  chunksize={label:8s} stdlib {n / med_std:9.0f}/s  forkref {n / med_ours:9.0f}/s"
                f"   forkref/stdlib throughput: median {med_std / med_ours:5.2f}x, "
                f"best {min(t_std) / min(t_ours):5.2f}x (target >= 0.90)"
            )
    finally:
        stdlib.terminate()
        ours.terminate()


def scenario_late(nbytes: int, iters: int) -> None:
    global _GLOBAL
    print(
        f"\n== 3. late objects: new {nbytes / 2**30:.2f} GiB DataFrame per iteration, "
        f"{iters} iterations =="
    )
    ours_times, std_times = [], []
    base = build_frame(nbytes)
    with forkref.Pool(WORKERS) as pool:
        for k in range(iters):
            frame = late_frame(base, k)
            start = time.perf_counter()
            with forkref.share(frame) as handle:
                res_ours = pool.starmap(work, [(handle, i) for i in range(TASKS)])
            ours_times.append(time.perf_counter() - start)
            _GLOBAL = frame
            start = time.perf_counter()
            with mp.get_context("fork").Pool(WORKERS) as std:
                res_std = std.starmap(work_global, [(None, i) for i in range(TASKS)])
            std_times.append(time.perf_counter() - start)
            _GLOBAL = None
            assert res_ours == res_std
            del frame, handle
        generations = pool._engine.generation
    for k, (a, b) in enumerate(zip(ours_times, std_times, strict=True)):
        print(
            f"  iteration {k}: forkref long-lived pool {a:7.3f} s   "
            f"fresh stdlib pool + global {b:7.3f} s"
        )
    mean_ours, mean_std = sum(ours_times) / iters, sum(std_times) / iters
    print(
        f"  mean per iteration: forkref {mean_ours:.3f} s, stdlib {mean_std:.3f} s, "
        f"ratio {mean_ours / mean_std:.2f}x; worker generations forked: {generations}"
    )


def pickled_memory_child(kind: str, nbytes: int) -> None:
    """Scenario 4 in a fresh interpreter: print one line of peaks."""
    frame = build_frame(nbytes)
    me = os.getpid()
    if kind == "stdlib":
        pool: Any = mp.get_context("fork").Pool(WORKERS)
        pids: Callable[[], list[int]] = lambda: [p.pid for p in pool._pool]  # noqa: E731
    else:
        pool = forkref.Pool(WORKERS, share_threshold=None)
        pids = pool.pids
    jobs = [(frame, i) for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", forkref.PerformanceWarning)
        with forkref.MemorySampler(lambda: [me, *pids()], interval=0.02) as sampler:
            start = time.perf_counter()
            pool.starmap(work, jobs, chunksize=1)
            seconds = time.perf_counter() - start
    pool.close()
    pool.join()
    peaks = {p.pid: p for p in sampler.peaks().processes}
    workers = sorted((p.uss for pid, p in peaks.items() if pid != me), reverse=True)[:WORKERS]
    print(seconds, peaks[me].rss, *workers)


def scenario_pickled_memory(nbytes: int, rounds: int) -> None:
    print(
        f"\n== 4. the pickled path: a {nbytes / 2**20:.0f} MiB DataFrame as a plain argument to "
        "8 tasks, chunksize=1, 2 workers (each run in a fresh interpreter) =="
    )
    rows: dict[str, list[list[float]]] = {"stdlib": [], "forkref": []}
    for _ in range(rounds):
        for kind, runs in rows.items():
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", kind, "--pickled-size", str(nbytes)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            runs.append([float(x) for x in out])
    mib = 2**20
    for kind, runs in rows.items():
        rss = statistics.median(r[1] for r in runs)
        uss = [statistics.median(r[2 + k] for r in runs) for k in range(WORKERS)]
        secs = statistics.median(r[0] for r in runs)
        print(
            f"  {kind:8s} map {secs:6.2f} s   parent peak RSS {rss / mib:7.0f} MiB   "
            f"worker peak USS {' '.join(f'{u / mib:5.0f}' for u in uss)} MiB"
        )
    pairs = list(zip(rows["forkref"], rows["stdlib"], strict=True))
    ratio_rss = [f[1] / s[1] for f, s in pairs]
    ratio_uss = [max(f[2:]) / max(s[2:]) for f, s in pairs]
    print(
        f"  forkref/stdlib: parent peak RSS {statistics.median(ratio_rss):.2f}x "
        f"(range {min(ratio_rss):.2f}-{max(ratio_rss):.2f}), largest worker peak USS "
        f"{statistics.median(ratio_uss):.2f}x (range {min(ratio_uss):.2f}-{max(ratio_uss):.2f}) "
        f"over {rounds} rounds (target <= 1.25)"
    )


def scenario_imap(n: int, rounds: int) -> None:
    print(f"\n== 5. imap over {n} trivial items, chunksize=1, pools already started ==")
    stdlib = mp.get_context("fork").Pool(WORKERS)
    ours = forkref.Pool(WORKERS)
    try:
        stdlib.map(trivial, range(8))
        ours.map(trivial, range(8))
        for method in ("imap", "imap_unordered"):
            times: dict[str, list[float]] = {"stdlib": [], "forkref": []}
            for _ in range(rounds):
                for label, pool in (("stdlib", stdlib), ("forkref", ours)):
                    start = time.perf_counter()
                    total = sum(getattr(pool, method)(trivial, range(n)))
                    times[label].append(time.perf_counter() - start)
                    assert total == n * (n + 1) // 2
            per_round = [s / f for s, f in zip(times["stdlib"], times["forkref"], strict=True)]
            med_s, med_f = statistics.median(times["stdlib"]), statistics.median(times["forkref"])
            print(
                f"  {method:15s} stdlib {n / med_s:8.0f}/s  forkref {n / med_f:8.0f}/s   "
                f"forkref/stdlib throughput: median of rounds {statistics.median(per_round):.2f}x "
                f"(range {min(per_round):.2f}-{max(per_round):.2f}) (target >= 1)"
            )
    finally:
        stdlib.terminate()
        ours.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--df-size", default="1GiB", help="DataFrame size (default 1GiB)")
    parser.add_argument("--dicts", type=int, default=2_000_000, help="length of the list of dicts")
    parser.add_argument("--trivial", type=int, default=100_000, help="number of trivial tasks")
    parser.add_argument("--chunksizes", default="1,100,default", help="chunksizes for scenario 2")
    parser.add_argument("--late-iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--joblib-rounds", type=int, default=1)
    parser.add_argument("--only", default="1,2,3,4,5", help="scenarios to run")
    parser.add_argument("--pickled-size", default="384MiB", help="DataFrame size for scenario 4")
    parser.add_argument("--imap-items", type=int, default=20_000, help="items for scenario 5")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        pickled_memory_child(args.memory_child, parse_size(args.pickled_size))
        return 0
    only = set(args.only.split(","))
    nbytes = parse_size(args.df_size)
    warnings.simplefilter("ignore", forkref.ForkWarning)  # numpy/BLAS threads are expected here
    print(f"Python {sys.version.split()[0]}, {WORKERS} workers, {TASKS} tasks")
    if "1" in only:
        frame = build_frame(nbytes)
        scenario_big(
            f"a {nbytes / 2**30:.2f} GiB DataFrame", frame, args.rounds, args.joblib_rounds
        )
        del frame
        dicts = build_dicts(args.dicts)
        scenario_big(f"a list of {args.dicts} small dicts", dicts, args.rounds, args.joblib_rounds)
        del dicts
    if "2" in only:
        chunks = [None if c == "default" else int(c) for c in args.chunksizes.split(",")]
        scenario_trivial(args.trivial, chunks, max(args.rounds, 9))
    if "3" in only:
        scenario_late(nbytes, args.late_iters)
    if "4" in only:
        scenario_pickled_memory(parse_size(args.pickled_size), max(1, args.rounds // 2))
    if "5" in only:
        scenario_imap(args.imap_items, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
