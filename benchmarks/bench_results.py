"""Big results coming back: four tasks each returning a 256 MiB array, stdlib vs forkref.

One run, under fork and spawn, the two pools side by side on the same task:

* ``multiprocessing`` ``Pool(2).map(make, range(4))``: each result pickled
  through the pipe (what the stdlib does);
* ``forkref.Pool(2, context=...)``: the same call, unchanged task; the
  arrays come back through shared memory (``result_threshold``, default on);
* ``forkref.Pool(..., result_threshold=None)``: forkref with the pipe, to
  show where the gain comes from.

Pools are started and warmed before the clock; the clock runs from ``map``
to the four arrays in the parent, then (second column) until the parent has
also read every value. Times are medians of ``--rounds`` rounds; ratios are
forkref's median over the stdlib's, from the same minutes.

    python benchmarks/bench_results.py             # 4 x 256 MiB, 3 rounds
    python benchmarks/bench_results.py --size 64MiB
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import forkref
from forkref._tools.bench.data import parse_size

MiB = 1 << 20
_NBYTES = 256 * MiB


def _set_size(nbytes: int) -> None:
    global _NBYTES
    _NBYTES = nbytes


def make(i: int) -> np.ndarray:
    """The task: a new array of ``_NBYTES`` (its build is part of every peer's time)."""
    return np.full(_NBYTES // 8, float(i))


def _round(pool: Any) -> tuple[float, float]:
    t0 = time.perf_counter()
    results = pool.map(make, range(4), chunksize=1)
    got = time.perf_counter() - t0
    total = sum(float(r.sum()) for r in results)  # the parent reads every value
    read = time.perf_counter() - t0
    assert total == sum(float(i) * (_NBYTES // 8) for i in range(4))
    return got, read


def _peer(make_pool: Callable[[], Any], rounds: int) -> tuple[list[float], list[float]]:
    pool = make_pool()
    try:
        pool.map(make, range(2), chunksize=1)  # workers up (and the module imported)
        times = [_round(pool) for _ in range(rounds)]
    finally:
        pool.terminate()
        pool.join()
    return [t for t, _ in times], [r for _, r in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256MiB", help="bytes per result (default 256MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    nbytes = parse_size(args.size)
    print(
        f"Four tasks each returning a {nbytes / MiB:.0f} MiB array, 2 workers, median of "
        f"{args.rounds} rounds (python {sys.version.split()[0]}; a shared machine)"
    )
    print(f"{'start method / peer':<44} {'got s':>7} {'read s':>7} {'vs stdlib':>10}")
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        _set_size(nbytes)
        peers: dict[str, Callable[[], Any]] = {
            "stdlib Pool (pickled through the pipe)": lambda c=ctx: c.Pool(2, _set_size, (nbytes,)),
            "forkref.Pool (results in shared memory)": lambda c=ctx: forkref.Pool(
                2, _set_size, (nbytes,), context=c
            ),
            "forkref.Pool, result_threshold=None": lambda c=ctx: forkref.Pool(
                2, _set_size, (nbytes,), context=c, result_threshold=None
            ),
        }
        base = None
        for name, make_pool in peers.items():
            got, read = _peer(make_pool, args.rounds)
            med = statistics.median(got)
            base = base or med
            spread = f"{min(got):.2f}-{max(got):.2f}"
            print(
                f"{method + ': ' + name:<44} {med:7.3f} {statistics.median(read):7.3f} "
                f"{med / base:9.2f}x   (got: {spread})"
            )
    print("got: map() returned the four arrays; read: and the parent summed every value.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
