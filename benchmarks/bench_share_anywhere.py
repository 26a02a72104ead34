"""share() anywhere: what the fork hook costs, and the thread's scenario against the global trick.

Part 1, the hook. At every ``os.fork()`` forkref records weak references to
the objects the forking thread's frames and module globals hold
(``forkref._refs.forkrecord``). This measures, side by side with recording on
and off:

* ``scan``: the recording alone, called directly (steady state: the objects
  were recorded at an earlier fork, as in a program that forks repeatedly),
  twice: ``warm`` in a loop of scans, and ``after fork`` right after a fork,
  when every first write to a page of the parent costs a page fault (the
  kernel write-protects them all at a fork), as in a loop that forks;
* ``fork``: a full ``os.fork()`` + child ``os._exit(0)`` + ``waitpid`` round
  trip from the same frame, the cost a pool pays per worker it forks;

for a shallow and a deep stack (recursion of ``--depth`` frames, each with a
few locals) and small and big module globals (``--globals`` names: ints,
strings, functions and weakref-able instances, as a notebook's ``__main__``
holds). Best of ``--forks`` forks, interleaved on/off (medians in the JSON).

Part 2, the thread's scenario (hn-thread.md): objects made in ``parent()``,
``Pool(2)`` forks, and the references are taken *inside* the ``with`` block,
after the fork. 16 tasks on 2 stdlib fork workers, each summing 1/16 of a
DataFrame:

* ``global``       the frame is a module global set before the pool forks
                   (the hand-made trick, the best case);
* ``no hook``      the same with forkref's fork hook turned off: what the hook
                   costs a real pool start;
* ``share-before`` ``forkref.share(frame)`` before the pool forks;
* ``share-after``  ``forkref.share(frame)`` after the pool forked (the thread's
                   code), resolved through the fork record;
* ``pickled``      the frame as a plain argument (small sizes only).

Totals include the pool start (the forks); best of ``--rounds`` interleaved
rounds, medians also printed.

Run: ``python benchmarks/bench_share_anywhere.py [--depth 200] [--globals 10000]
[--forks 200] [--sizes 16MiB,256MiB] [--rounds 7] [--json out.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import psutil

import forkref
from forkref._refs import forkrecord
from forkref._tools.demo import build_frame, parse_size

TASKS = 16
WORKERS = 2

# -- part 1: the hook -----------------------------------------------------------------


class _Item:
    def __init__(self, n: int) -> None:
        self.n = n


def _module_with_globals(count: int) -> types.ModuleType:
    """A module whose namespace holds ``count`` globals of mixed kinds, and ``descend``."""
    mod = types.ModuleType(f"bench_globals_{count}")
    names: dict[str, Any] = vars(mod)
    for i in range(count):
        kind = i % 4
        names[f"g{i}"] = (
            i if kind == 0 else f"value {i}" if kind == 1 else _Item(i) if kind == 2 else _Item
        )
    code = """
def descend(depth, action):
    a, b, c = depth, [depth], {"depth": depth}  # a few locals per frame
    if depth <= 0:
        return action()
    return descend(depth - 1, action)
"""
    exec(compile(code, mod.__name__, "exec"), names)
    sys.modules[mod.__name__] = mod
    return mod


def _fork_once() -> float:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def _scan_once() -> float:
    t0 = time.perf_counter()
    forkrecord.record(sys._getframe(1))
    return time.perf_counter() - t0


def hook_cost(depth: int, n_globals: int, forks: int) -> dict[str, Any]:
    """Scan and fork times with recording on and off, from ``depth`` frames down."""
    mod = _module_with_globals(n_globals)
    descend: Callable[[int, Callable[[], float]], float] = mod.descend
    descend(depth, _fork_once)  # first fork: records everything once
    times: dict[str, list[float]] = {"warm": [], "scan": [], "fork_on": [], "fork_off": []}
    for _ in range(forks):
        times["warm"].append(descend(depth, _scan_once))
    for _ in range(forks):
        times["scan"].append(descend(depth, _scan_once))
        times["fork_on"].append(descend(depth, _fork_once))
        forkrecord.set_enabled(False)
        try:
            times["fork_off"].append(descend(depth, _fork_once))
        finally:
            forkrecord.set_enabled(True)
    del sys.modules[mod.__name__]
    # Best of N: on a busy machine the median measures the neighbours too.
    best = {f"{k}_us": 1e6 * min(v) for k, v in times.items()}
    median = {f"{k}_median_us": 1e6 * statistics.median(v) for k, v in times.items()}
    return {"depth": depth, "globals": n_globals, **best, **median}


def hook_report(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'stack':>6} {'globals':>8} | {'scan us: warm':>13} {'after fork':>10} | "
        f"{'fork+exit+wait us: off':>22} {'on':>7} | {'on/off':>6} {'scan/fork':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['depth']:>6} {r['globals']:>8} | {r['warm_us']:>13.0f} {r['scan_us']:>10.0f} | "
            f"{r['fork_off_us']:>22.0f} {r['fork_on_us']:>7.0f} | "
            f"{r['fork_on_us'] / r['fork_off_us']:>5.2f}x {r['scan_us'] / r['fork_off_us']:>8.1%}"
        )
    return "\n".join(lines)


# -- part 2: the thread's scenario ------------------------------------------------------------

_GLOBAL: Any = None


def slice_sum(df: Any, part: int) -> float:
    rows = len(df)
    return float(df.iloc[rows * part // TASKS : rows * (part + 1) // TASKS].to_numpy().sum())


def slice_sum_global(_: None, part: int) -> float:
    return slice_sum(_GLOBAL, part)


def _scenario(mode: str, frame: Any) -> tuple[float, list[float]]:
    """One run of the thread's ``parent()``: pool start + map, and the results."""
    global _GLOBAL
    df = frame  # a local of this frame when the pool forks, as in parent()
    handle = forkref.share(df) if mode == "share-before" else None
    if mode in ("global", "no hook"):
        _GLOBAL = df
    hooked = forkrecord.set_enabled(mode != "no hook")
    gc.collect()
    try:
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(WORKERS) as pool:
            if mode == "share-after":
                handle = forkref.share(df)  # after the fork, inside the with block
            fn = slice_sum_global if mode in ("global", "no hook") else slice_sum
            arg = {"global": None, "no hook": None, "pickled": df}.get(mode, handle)
            out = pool.starmap(fn, [(arg, i) for i in range(TASKS)], 1)
            elapsed = time.perf_counter() - t0
    finally:
        forkrecord.set_enabled(hooked)
        _GLOBAL = None
    return elapsed, out


def scenario(size: int, rounds: int) -> dict[str, Any]:
    frame = build_frame(size)
    modes = ["no hook", "global", "share-before", "share-after"]
    if size <= 64 * 2**20:
        modes.append("pickled")
    times: dict[str, list[float]] = {m: [] for m in modes}
    expected = None
    for _ in range(rounds):  # interleaved: drift on a shared machine hits all alike
        for mode in modes:
            elapsed, out = _scenario(mode, frame)
            expected = out if expected is None else expected
            assert out == expected, f"{mode} computed something else"
            times[mode].append(elapsed)
    return {
        "size_bytes": int(frame.memory_usage(index=True).sum()),
        **{m: {"best_s": min(t), "median_s": statistics.median(t)} for m, t in times.items()},
    }


def scenario_report(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'size':>7} | {'best s: no hook':>15} {'global':>7} {'before':>7} {'after':>7} "
        f"{'pickled':>7} | {'global/no hook':>14} | {'after/global':>12} {'median':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        best = {m: r[m]["best_s"] for m in r if m != "size_bytes"}
        pickled = f"{best['pickled']:>7.3f}" if "pickled" in best else f"{'-':>7}"
        lines.append(
            f"{r['size_bytes'] / 2**20:>5.0f}Mi | {best['no hook']:>15.3f} {best['global']:>7.3f} "
            f"{best['share-before']:>7.3f} {best['share-after']:>7.3f} {pickled} | "
            f"{best['global'] / best['no hook']:>13.2f}x | "
            f"{best['share-after'] / best['global']:>11.2f}x "
            f"{r['share-after']['median_s'] / r['global']['median_s']:>5.2f}x"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=200, help="frames of the deep stack")
    parser.add_argument("--globals", type=int, default=10_000, help="globals of the big module")
    parser.add_argument("--forks", type=int, default=200, help="forks per hook measurement")
    parser.add_argument("--sizes", default="16MiB,256MiB", help="frame sizes of part 2")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of part 2")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    import pandas  # noqa: F401  (a realistic parent: the fork copies its page tables)

    hook_rows = []
    for depth in (10, args.depth):
        for n_globals in (100, args.globals):
            print(f"hook: {depth} frames, {n_globals} globals ...", file=sys.stderr, flush=True)
            hook_rows.append(hook_cost(depth, n_globals, args.forks))
    rss = psutil.Process().memory_info().rss / 2**20
    print(
        f"Fork hook, Python {sys.version.split()[0]}, parent RSS {rss:.0f} MiB (numpy and "
        f"pandas imported); best of {args.forks} forks; 'stack' counts the recursion frames"
    )
    print(hook_report(hook_rows))
    print()
    scenario_rows = []
    for text in args.sizes.split(","):
        print(f"scenario {text} ...", file=sys.stderr, flush=True)
        scenario_rows.append(scenario(parse_size(text), args.rounds))
    print(
        f"The thread's parent(): {TASKS} tasks summing 1/{TASKS} of a DataFrame each, on "
        f"{WORKERS} stdlib fork workers; pool start + map; best of {args.rounds} interleaved "
        "rounds ('median' is the ratio of medians)"
    )
    print(scenario_report(scenario_rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"hook": hook_rows, "scenario": scenario_rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
