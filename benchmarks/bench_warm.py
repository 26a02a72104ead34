"""A new big object to running spawn workers, again and again: the warm segment store.

One run, peers side by side on the same objects. Every round makes a *new*
array (default 1 GiB, never seen by the workers) outside the clock; the clock
runs from handing it over until both of 2 running spawn workers hold it (a
barrier in the workers makes "both" exact). Peers:

* ``forkref.share`` + a two-task ``map`` on a running stdlib spawn Pool;
  ``release()`` after each round. Round 1 writes fresh tmpfs pages; later
  rounds reuse parked segments of the warm store (``forkref._shm.warm``);
* ``ray.put`` + two tasks on a running Ray (``ray.init(num_cpus=2)``), the
  object reference dropped after each round;
* a warm ``memcpy`` of the same bytes into an already written buffer: the
  floor for any copy into shared memory.

Also measured apart (``--write-methods``): a first write of fresh tmpfs pages
with ``pwrite`` vs through a mapping, and reading a segment mapped with and
without ``MAP_POPULATE``, the choices the store makes.

    python benchmarks/bench_warm.py                 # 1 GiB, 8 rounds
    python benchmarks/bench_warm.py --size 256MiB --no-ray

Reported: the first round, then the median and range of rounds 3..N
(round 2 may still write fresh pages: a worker maps the first segment until
its next task), and each warm median over the warm memcpy's median. The
machine is shared: read the ratios, which come from the same minutes.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

import forkref
from forkref._tools.bench.data import parse_size

MiB = 1 << 20
_barrier: Any = None


def _init(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def _hold(obj: Any) -> tuple[int, int]:
    _barrier.wait()  # both workers hold the array now
    return os.getpid(), int(obj.nbytes)


def _new(base: np.ndarray, i: int) -> np.ndarray:
    out = base + float(i)  # a new object every round, its pages written
    return out


def run_forkref(base: np.ndarray, rounds: int) -> list[float]:
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(2, initializer=_init, initargs=(ctx.Barrier(2),))
    try:
        pool.map(_hold, [np.zeros(1), np.zeros(1)], chunksize=1)  # workers up
        times = []
        for i in range(rounds):
            obj = _new(base, i)
            t0 = time.perf_counter()
            handle = forkref.share(obj)
            held = pool.map(_hold, [handle, handle], chunksize=1)
            times.append(time.perf_counter() - t0)
            assert len({pid for pid, _ in held}) == 2
            assert held[0][1] == obj.nbytes
            handle.release()
            del obj, handle
        return times
    finally:
        pool.terminate()
        pool.join()


def run_ray(base: np.ndarray, rounds: int) -> list[float] | str:
    try:
        import ray
    except ImportError:
        return "ray is not installed"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        hold = ray.remote(lambda a: int(a.nbytes))
        ray.get([hold.remote(np.zeros(1)) for _ in range(2)])  # workers up
        times = []
        for i in range(rounds):
            obj = _new(base, i)
            t0 = time.perf_counter()
            ref = ray.put(obj)
            sizes = ray.get([hold.remote(ref), hold.remote(ref)])
            times.append(time.perf_counter() - t0)
            assert sizes == [obj.nbytes] * 2
            del ref, obj
            gc.collect()
        return times
    finally:
        ray.shutdown()


def run_memcpy(base: np.ndarray, rounds: int) -> list[float]:
    dst = np.empty_like(base)
    dst.fill(0)  # written: a warm destination
    times = []
    for i in range(rounds):
        obj = _new(base, i)
        t0 = time.perf_counter()
        np.copyto(dst, obj)
        times.append(time.perf_counter() - t0)
    return times


def write_methods(nbytes: int, rounds: int = 3) -> dict[str, list[float]]:
    """GB/s of a first write to fresh tmpfs pages, pwrite vs a mapping; and of a
    read of a written segment mapped lazily vs with MAP_POPULATE."""
    from forkref._shm import segments

    src = np.ones(nbytes, dtype=np.uint8)
    out: dict[str, list[float]] = {k: [] for k in ("pwrite", "mmap", "read", "read populate")}
    for _ in range(rounds):
        for how in ("pwrite", "mmap"):
            fd = segments.create_anonymous(nbytes, "the write benchmark")
            t0 = time.perf_counter()
            if how == "pwrite":
                segments.write_at(fd, 0, memoryview(src), "the write benchmark")
            else:
                with mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED) as m:
                    np.frombuffer(m, dtype=np.uint8)[:] = src
            out[how].append(nbytes / (time.perf_counter() - t0) / 1e9)
            for name, flags in (("read", 0), ("read populate", mmap.MAP_POPULATE)):
                t0 = time.perf_counter()
                m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | flags, prot=mmap.PROT_READ)
                int(np.frombuffer(m, dtype=np.uint64).sum())
                out[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
                m.close()
            os.close(fd)
    return out


def _line(name: str, first: float, warm: list[float], floor: float) -> str:
    med = statistics.median(warm)
    return (
        f"{name:<36} {first:8.3f} {med:8.3f} {min(warm):8.3f}-{max(warm):<8.3f} {med / floor:6.2f}x"
    )


def _store_counts() -> str:
    from forkref._shm import export

    server = export._server
    if server is None:
        return "no export server"
    store = server.store.warm
    return f"{store.created} segments written fresh, {store.reused} reused"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB", help="array size (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per peer (default 8)")
    parser.add_argument("--no-ray", action="store_true", help="skip ray")
    parser.add_argument("--write-methods", action="store_true", help="also time write/read ways")
    args = parser.parse_args(argv)
    nbytes = parse_size(args.size)
    base = np.arange(nbytes // 8, dtype=np.float64)
    copy = run_memcpy(base, args.rounds)
    share = run_forkref(base, args.rounds)
    counts = _store_counts()
    ray_times = "skipped (--no-ray)" if args.no_ray else run_ray(base, args.rounds)
    copy_again = run_memcpy(base, args.rounds)  # the floor after, too: the machine drifts
    floor_times = copy[2:] + copy_again[2:]
    floor = statistics.median(floor_times)
    print(
        f"A new {nbytes / MiB:.0f} MiB array to 2 running spawn workers, {args.rounds} rounds "
        f"(python {sys.version.split()[0]}, {os.cpu_count()} cpus; a shared machine)"
    )
    print(f"{'peer':<36} {'first s':>8} {'median':>8} {'range (rounds 3+)':>17} {'/memcpy':>7}")
    print(_line("warm memcpy (the floor)", copy[0], floor_times, floor))
    print(_line("forkref.share + map (warm store)", share[0], share[2:], floor))
    if isinstance(ray_times, str):
        print(f"{'ray.put + 2 tasks':<36} {ray_times}")
    else:
        print(_line("ray.put + 2 tasks (running ray)", ray_times[0], ray_times[2:], floor))
    print(
        "/memcpy: the peer's median over the warm memcpy's median (rounds 3+ of a memcpy run "
        f"before and one after the peers). forkref's store: {counts}."
    )
    if args.write_methods:
        size = min(nbytes, 512 * MiB)
        print(f"\nFirst write of fresh tmpfs pages and reads, {size / MiB:.0f} MiB, GB/s (3 runs):")
        for name, rates in write_methods(size).items():
            print(f"  {name:<14} " + "  ".join(f"{r:5.2f}" for r in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
