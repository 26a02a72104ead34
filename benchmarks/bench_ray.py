"""Ray backend benchmark: one run, the peers side by side on one local Ray instance.

Part 1: 16 tasks over a DataFrame (default 1 GiB) on 2 workers; each task sums
a 1/16 slice of one column. Then, untimed, the same 16 tasks again report
their worker's USS (psutil, inside the task, after touching the slice). Peers:

* ``forkref.Pool(2, backend="ray")`` with ``forkref.share(frame)``: the frame
  is put into Ray's object store once, each actor reads it zero-copy;
* ``ray.util.multiprocessing.Pool(2)`` with the frame as a plain argument:
  Ray's drop-in pool sends the arguments with every batch (default chunksize);
* hand-written ``ray.put(frame)`` + ``@ray.remote`` tasks: the best a Ray user
  writes by hand.

Timed: from handing the frame over (share/put) to the 16th result, on pools
whose workers are already up (each round makes a fresh pool and warms it
with a 32-row frame, so pandas is imported; every round puts the frame
again). Rounds are interleaved, one of each peer per round, after one
untimed put that faults the object store's pages in. Object-store use is
sampled every 20 ms during the timed part; the peak is reported.

Part 2: 1,000 tiny tasks (``abs``): forkref's Ray backend vs
``ray.util.multiprocessing.Pool``, as ``map`` (default chunksize), ``map``
with ``chunksize=1`` and 1,000 ``apply_async`` calls; tasks per second.

Run: ``python benchmarks/bench_ray.py`` (``--size 256MiB`` for a quick run).
Needs ``pip install 'forkref[ray]' pandas``. Times are the best of
``--rounds`` rounds (Ray's pool: ``--pool-rounds``); the first round is shown
too. The machine is shared: look at the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Before Ray is imported: its servers listen on 127.0.0.1 only, and its files
# (sockets, logs, the "current cluster" address file) stay in a directory of this run.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pandas as pd
import psutil

import forkref
from forkref._tools.demo import parse_size

MiB = 1 << 20
TASKS = 16
TINY = 1000


# -- the task (module level: every peer runs the same function) --------------------------


def slice_sum(df: pd.DataFrame, part: int) -> float:
    """Sum one 1/16 slice of column "a"."""
    column = df["a"].to_numpy()
    n = len(column) // TASKS
    return float(column[part * n : (part + 1) * n].sum())


def slice_uss(df: pd.DataFrame, part: int) -> tuple[int, int]:
    """The same sum, then this worker's pid and USS (reading smaps takes ~10 ms: untimed)."""
    slice_sum(df, part)
    return os.getpid(), psutil.Process().memory_full_info().uss


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Run:
    """One peer's rounds: seconds of each, the peak store use, each worker's peak USS."""

    seconds: list[float] = field(default_factory=list)
    store_peak: int = 0
    uss: dict[int, int] = field(default_factory=dict)
    note: str = ""

    def add(self, seconds: float, store_peak: int, uss: list[tuple[int, int]]) -> None:
        self.seconds.append(seconds)
        self.store_peak = max(self.store_peak, store_peak)
        for pid, value in uss:
            self.uss[pid] = max(self.uss.get(pid, 0), value)


class StoreSampler:
    """Peak object-store use (all nodes) while the block runs, sampled every 20 ms."""

    def __init__(self) -> None:
        from forkref._launchers.ray.memory import object_store_use

        self._read = object_store_use
        self.peak = 0
        self._stop = threading.Event()

    def _used(self) -> int:
        import ray

        stores, _ = self._read(ray)
        return sum(s.used for s in stores)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    @contextmanager
    def sampling(self) -> Iterator[StoreSampler]:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self._used())


def checked_seconds(body: Callable[[], list[float]], expect: list[float]) -> float:
    """Seconds ``body`` takes; it must compute ``expect``."""
    start = time.perf_counter()
    results = body()
    seconds = time.perf_counter() - start
    if results != expect:
        raise SystemExit("a peer computed wrong sums: the benchmark is broken")
    return seconds


def timed(
    run: Run,
    body: Callable[[], list[float]],
    expect: list[float],
    uss: Callable[[], list[tuple[int, int]]],
) -> None:
    """Time ``body`` (sampling the store), check its sums, then read the workers' USS."""
    sampler = StoreSampler()
    with sampler.sampling():
        seconds = checked_seconds(body, expect)
    run.add(seconds, sampler.peak, uss())


def timed_again(name: str, body: Callable[[], list[float]], expect: list[float]) -> None:
    """Time a second map over the object already handed over (a pool's later maps)."""
    AGAIN.setdefault(name, Run()).seconds.append(checked_seconds(body, expect))


#: Second maps over the same object, per peer (see timed_again).
AGAIN: dict[str, Run] = {}


# -- part 1: the peers -------------------------------------------------------------------


#: Above Ray's inline limit (100 KiB): a warm-up object of this size goes through the store.
WARM_BYTES = 2 * MiB


def small(frame: pd.DataFrame) -> pd.DataFrame:
    """The warm-up frame: the first WARM_BYTES of ``frame``, a copy of its own."""
    return frame.iloc[: WARM_BYTES // 8].copy()


def warm(starmap: Callable[..., Any], arg: Any) -> None:
    """Both workers up, with pandas imported, the task function loaded and the object
    store mapped in (a new Ray worker process maps it at its first object): not timed.

    Until both have run a task: a pool's actors start one after the other, and
    the first one up may take every warm-up task while the second still starts
    (which would put an actor's start-up, about 0.3 s, on the clock).
    """
    pids: set[int] = set()
    deadline = time.monotonic() + 120
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.update(pid for pid, _ in starmap(slice_uss, [(arg, 0), (arg, 1)], chunksize=1))
    if len(pids) < 2:
        raise SystemExit("warm-up: the second worker never ran a task")


def round_forkref(frame: pd.DataFrame, run: Run, expect: list[float]) -> None:
    args = list(range(TASKS))
    with forkref.Pool(2, backend="ray") as pool, forkref.share(frame) as handle:
        with forkref.share(small(frame)) as warm_handle:
            warm(pool.starmap, warm_handle)
        timed(
            run,
            lambda: pool.starmap(slice_sum, [(handle, i) for i in args]),
            expect,
            lambda: pool.starmap(slice_uss, [(handle, i) for i in args]),
        )
        timed_again(
            "forkref.Pool(backend='ray')",
            lambda: pool.starmap(slice_sum, [(handle, i) for i in args]),
            expect,
        )


def round_ray_pool(frame: pd.DataFrame, run: Run, expect: list[float]) -> None:
    from ray.util.multiprocessing import Pool

    args = [(frame, i) for i in range(TASKS)]
    pool = Pool(2)
    try:
        warm(pool.starmap, small(frame))
        timed(
            run,
            lambda: list(pool.starmap(slice_sum, args)),
            expect,
            lambda: list(pool.starmap(slice_uss, args)),
        )
    finally:
        pool.terminate()


def round_by_hand(frame: pd.DataFrame, run: Run, expect: list[float]) -> None:
    import ray

    task, task_uss = ray.remote(slice_sum), ray.remote(slice_uss)
    warm(
        lambda fn, args, chunksize: ray.get([task_uss.remote(*a) for a in args]),
        ray.put(small(frame)),
    )
    refs: list[Any] = []

    def body() -> list[float]:
        refs[:] = [ray.put(frame)]
        return list(ray.get([task.remote(refs[0], i) for i in range(TASKS)]))

    timed(
        run,
        body,
        expect,
        lambda: list(ray.get([task_uss.remote(refs[0], i) for i in range(TASKS)])),
    )
    timed_again(
        "hand-written ray.put + remote",
        lambda: list(ray.get([task.remote(refs[0], i) for i in range(TASKS)])),
        expect,
    )


PEERS: dict[str, Callable[[pd.DataFrame, Run, list[float]], None]] = {
    "forkref.Pool(backend='ray')": round_forkref,
    "hand-written ray.put + remote": round_by_hand,
    "ray.util.multiprocessing.Pool": round_ray_pool,
}


def run_part1(frame: pd.DataFrame, rounds: int, pool_rounds: int) -> dict[str, Run]:
    """Rounds interleaved (one of each peer per round), after one untimed put of the frame.

    Ray's store is fastest on pages it has written before: the warm-up put
    and the interleaving give every peer the same store, and the order turns
    each round, so no peer always runs right after Ray's pool has filled the
    store.
    """
    import ray

    n = len(frame) // TASKS
    column = frame["a"].to_numpy()
    expect = [float(column[i * n : (i + 1) * n].sum()) for i in range(TASKS)]
    del column
    ray.get(ray.put(frame))  # fault the store's pages in once, for everyone
    runs = {name: Run() for name in PEERS}
    names = list(PEERS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            one_round = PEERS[name]
            if name == "ray.util.multiprocessing.Pool" and r >= pool_rounds:
                continue
            one_round(frame, runs[name], expect)
    return runs


# -- part 2: tiny tasks --------------------------------------------------------------------


def tiny_rates(pool: Any, rounds: int) -> dict[str, float]:
    """Tasks per second of ``pool`` for each call form (best of ``rounds``)."""
    items = list(range(-TINY, 0))
    expect = [abs(i) for i in items]
    def apply_async() -> list[int]:
        return [r.get() for r in [pool.apply_async(abs, (i,)) for i in items]]

    forms: dict[str, Callable[[], list[int]]] = {
        "map, default chunksize": lambda: list(pool.map(abs, items)),
        "map, chunksize=1": lambda: list(pool.map(abs, items, chunksize=1)),
        "apply_async x 1000": apply_async,
    }
    rates = {}
    for name, form in forms.items():
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            if form() != expect:
                raise SystemExit(f"{name}: wrong results: the benchmark is broken")
            best = min(best, time.perf_counter() - start)
        rates[name] = TINY / best
    return rates


def run_tiny(rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    from ray.util.multiprocessing import Pool as RayPool

    with forkref.Pool(2, backend="ray") as pool:
        pool.map(abs, [1, 2], chunksize=1)
        ours = tiny_rates(pool, rounds)
    ray_pool = RayPool(2)
    try:
        ray_pool.map(abs, [1, 2], chunksize=1)
        theirs = tiny_rates(ray_pool, rounds)
    finally:
        ray_pool.terminate()
    return ours, theirs


# -- report --------------------------------------------------------------------------------


def report(
    size: int, runs: dict[str, Run], tiny: tuple[dict[str, float], dict[str, float]]
) -> None:
    print(
        f"Part 1: {TASKS} tasks over a {size / MiB:,.0f} MiB DataFrame on 2 Ray workers, "
        f"Python {sys.version.split()[0]}, Ray {_ray_version()}; "
        "seconds from handing the frame over to the last result"
    )
    header = (
        f"{'peer':<34} {'rounds':>6} {'first s':>8} {'best s':>8} {'median s':>9} "
        f"{'store peak MiB':>15} {'worker USS MiB':>16}"
    )
    print(header)
    print("-" * len(header))
    for name, run in runs.items():
        uss = " ".join(f"{u / MiB:,.0f}" for u in sorted(run.uss.values(), reverse=True)[:4])
        print(
            f"{name:<34} {len(run.seconds):>6} {run.seconds[0]:>8.3f} {min(run.seconds):>8.3f} "
            f"{statistics.median(run.seconds):>9.3f} {run.store_peak / MiB:>15,.0f} {uss:>16}"
        )
    ours = runs["forkref.Pool(backend='ray')"].seconds
    by_hand = runs["hand-written ray.put + remote"].seconds
    ray_pool = min(runs["ray.util.multiprocessing.Pool"].seconds)
    print(
        f"\nforkref vs hand-written: {min(ours) / min(by_hand):.2f}x the time, best rounds; "
        f"{statistics.median(ours) / statistics.median(by_hand):.2f}x, medians "
        "(goal: within 1.2x)"
    )
    print(f"ray.util.multiprocessing.Pool vs forkref: {ray_pool / min(ours):.1f}x the time")
    print("\nThe same pool (hand-written: the same ObjectRef) mapping the same frame again")
    for name, run in AGAIN.items():
        print(
            f"{name:<34} {len(run.seconds):>6} best {min(run.seconds):.3f} s, "
            f"median {statistics.median(run.seconds):.3f} s"
        )
    ours_again = statistics.median(AGAIN["forkref.Pool(backend='ray')"].seconds)
    by_hand_again = statistics.median(AGAIN["hand-written ray.put + remote"].seconds)
    print(f"forkref vs hand-written, medians: {ours_again / by_hand_again:.2f}x the time")
    ours_rates, their_rates = tiny
    print(f"\nPart 2: {TINY:,} tiny tasks (abs) on 2 Ray workers, tasks per second (best round)")
    print(f"{'call':<26} {'forkref ray':>12} {'ray Pool':>10} {'forkref/ray Pool':>17}")
    for name, rate in ours_rates.items():
        theirs = their_rates[name]
        print(f"{name:<26} {rate:>12,.0f} {theirs:>10,.0f} {rate / theirs:>16.1f}x")


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="frame size (1GiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per peer (5)")
    parser.add_argument(
        "--pool-rounds", type=int, default=2, help="rounds for ray.util.multiprocessing.Pool (2)"
    )
    args = parser.parse_args()
    try:
        import ray
    except ImportError:
        raise SystemExit("Ray is not installed: pip install 'forkref[ray]'") from None
    frame = pd.DataFrame({"a": np.arange(args.size // 8, dtype=np.float64)})
    tmp = tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = run_part1(frame, args.rounds, args.pool_rounds)
        tiny = run_tiny(args.rounds)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args.size, runs, tiny)


if __name__ == "__main__":
    main()
