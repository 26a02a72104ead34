"""The refcount copy-on-write experiment: plain list vs compact() vs a pyarrow Table.

The same N small dict records are held by a parent in three forms; the parent
forks W workers (default 2) that each read every record, then a sample of
random records. Each variant runs in its own freshly forked "parent" process,
so the variants do not share or disturb each other's memory.

Reported per variant: build time, the parent's memory for the container (its
USS growth while building it), each worker's USS and PSS after reading
everything, total PSS of parent + workers, and read throughput per worker
(sequential iteration and random access). Ratios against the plain list follow.

    python benchmarks/bench_cow.py                 # 2M records, 2 workers
    python benchmarks/bench_cow.py --items 200000 --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

import forkref

MiB = 2**20
RANDOM_READS = 100_000
ARROW_RANDOM_READS = 10_000  # one-row slices of a Table are slow; fewer, scaled per second


def records(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "name": f"item-{i}", "value": i * 0.5}


def _uss() -> int:
    return psutil.Process().memory_full_info().uss


# --- the three containers: build, iterate, random read -----------------------------


def build_list(n: int) -> Any:
    return list(records(n))


def build_compact(n: int) -> Any:
    return forkref.compact(records(n))


def build_arrow(n: int) -> Any:
    import pyarrow as pa

    def batches() -> Iterator[Any]:
        chunk: list[dict[str, Any]] = []
        for record in records(n):
            chunk.append(record)
            if len(chunk) == 100_000:
                yield pa.RecordBatch.from_pylist(chunk)
                chunk = []
        if chunk:
            yield pa.RecordBatch.from_pylist(chunk)

    return pa.Table.from_batches(batches())


def iterate_sequence(container: Any) -> tuple[int, float]:
    count, total = 0, 0.0
    for item in container:
        count += 1
        total += item["value"]
    return count, total


def iterate_arrow(table: Any) -> tuple[int, float]:
    # Rows as dicts, a batch at a time: the access pattern of the other two.
    count, total = 0, 0.0
    for batch in table.to_batches(max_chunksize=65_536):
        for item in batch.to_pylist():
            count += 1
            total += item["value"]
    return count, total


def get_sequence(container: Any, index: int) -> dict[str, Any]:
    return container[index]  # type: ignore[no-any-return]


def get_arrow(table: Any, index: int) -> dict[str, Any]:
    return table.slice(index, 1).to_pylist()[0]  # type: ignore[no-any-return]


VARIANTS: dict[str, tuple[Callable[[int], Any], Callable[[Any], tuple[int, float]], Any, int]] = {
    "list": (build_list, iterate_sequence, get_sequence, RANDOM_READS),
    "compact": (build_compact, iterate_sequence, get_sequence, RANDOM_READS),
    "arrow": (build_arrow, iterate_arrow, get_arrow, ARROW_RANDOM_READS),
}


# --- processes ----------------------------------------------------------------------


def _send(fd: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    os.write(fd, struct.pack("q", len(data)) + data)


def _recv(fd: int) -> dict[str, Any]:
    def exactly(size: int) -> bytes:
        chunks = b""
        while len(chunks) < size:
            chunk = os.read(fd, size - len(chunks))
            if not chunk:
                raise RuntimeError("a benchmark process died before reporting")
            chunks += chunk
        return chunks

    (size,) = struct.unpack("q", exactly(8))
    return json.loads(exactly(size))  # type: ignore[no-any-return]


def _in_child(body: Callable[[], None]) -> int:
    """Fork; run body in the child and exit it without ever returning."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _report_from_child(body: Callable[[int], None]) -> dict[str, Any]:
    """Fork; the child runs ``body(fd)``, which ``_send``s one report; return it."""
    result_r, result_w = os.pipe()
    pid = _in_child(lambda: body(result_w))
    os.close(result_w)  # so a child that dies is EOF, not a hang
    try:
        return _recv(result_r)
    finally:
        os.close(result_r)
        os.waitpid(pid, 0)


def _worker(variant: str, container: Any, n: int, report_fd: int, go_fd: int) -> None:
    _, iterate, get, reads = VARIANTS[variant]
    os.read(go_fd, 1)  # start together with the other workers
    started = time.perf_counter()
    count, total = iterate(container)
    iterate_s = time.perf_counter() - started
    rng = random.Random(os.getpid())
    indices = [rng.randrange(n) for _ in range(reads)]
    started = time.perf_counter()
    for index in indices:
        get(container, index)
    random_s = time.perf_counter() - started
    gc.collect()
    _send(report_fd, {"count": count, "total": total, "iterate_s": iterate_s, "random_s": random_s})
    os.read(go_fd, 1)  # stay alive until the parent has measured everyone


def _parent(variant: str, n: int, workers: int, result_fd: int) -> None:
    build = VARIANTS[variant][0]
    gc.collect()
    before = _uss()
    started = time.perf_counter()
    container = build(n)
    build_s = time.perf_counter() - started
    size = _uss() - before
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    with forkref.fork_hygiene():
        pids = [
            _in_child(lambda: _worker(variant, container, n, report_w, go_r))
            for _ in range(workers)
        ]
    after_fork = forkref.memory_report(pids)
    os.write(go_w, b"g" * workers)
    stats = [_recv(report_r) for _ in pids]
    report = forkref.memory_report({os.getpid(): "parent", **dict.fromkeys(pids, "worker")})
    os.write(go_w, b"x" * workers)
    for pid in pids:
        os.waitpid(pid, 0)
    _send(
        result_fd,
        {
            "variant": variant,
            "items": n,
            "workers": workers,
            "build_s": build_s,
            "container_bytes": size,
            "worker_uss_after_fork": [p.uss for p in after_fork.processes],
            "worker_uss": [p.uss for p in report.by_role("worker")],
            "worker_pss": [p.pss for p in report.by_role("worker")],
            "parent_pss": report.by_role("parent")[0].pss,
            "total_pss": report.total_pss,
            "total_rss": report.total_rss,
            "iterate_items_per_s": [n / s["iterate_s"] for s in stats],
            "random_reads_per_s": [VARIANTS[variant][3] / s["random_s"] for s in stats],
            "checksums_ok": all(s["count"] == n for s in stats)
            and len({s["total"] for s in stats}) == 1,
        },
    )


def run_variant(variant: str, n: int, workers: int) -> dict[str, Any]:
    return _report_from_child(lambda fd: _parent(variant, n, workers, fd))


# --- gc hygiene: a child's gc.collect() over the parent's tracked objects ---------------


def _child_growth_after_collect() -> int:
    def child(fd: int) -> None:
        before = _uss()
        gc.collect()
        _send(fd, {"growth": _uss() - before})

    return int(_report_from_child(child)["growth"])


def _gc_parent(n_objects: int, result_fd: int) -> None:
    gc.collect()
    before = _uss()
    tracked = [[i] for i in range(n_objects)]  # small lists: gc-tracked containers
    size = _uss() - before
    without = _child_growth_after_collect()
    with forkref.fork_hygiene():
        with_hygiene = _child_growth_after_collect()
    del tracked
    result = {"objects": n_objects, "bytes": size, "without": without, "with": with_hygiene}
    _send(result_fd, result)


def run_gc_hygiene(n_objects: int) -> dict[str, Any]:
    return _report_from_child(lambda fd: _gc_parent(n_objects, fd))


# --- output -----------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'variant':<8} {'build s':>8} {'size MiB':>9} {'worker USS MiB':>16} "
        f"{'worker PSS MiB':>16} {'total PSS':>10} {'iter Mit/s':>11} {'rand kit/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        uss = "/".join(f"{v / MiB:.0f}" for v in r["worker_uss"])
        pss = "/".join(f"{v / MiB:.0f}" for v in r["worker_pss"])
        print(
            f"{r['variant']:<8} {r['build_s']:>8.2f} {r['container_bytes'] / MiB:>9.0f} "
            f"{uss:>16} {pss:>16} {r['total_pss'] / MiB:>10.0f} "
            f"{_mean(r['iterate_items_per_s']) / 1e6:>11.2f} "
            f"{_mean(r['random_reads_per_s']) / 1e3:>11.0f}"
        )


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by_name = {r["variant"]: r for r in results}
    base = by_name["list"]
    out: dict[str, dict[str, float]] = {}
    for name, r in by_name.items():
        if name == "list":
            continue
        out[name] = {
            "worker_uss_vs_list": _mean(r["worker_uss"]) / _mean(base["worker_uss"]),
            "total_pss_vs_list": r["total_pss"] / base["total_pss"],
            "container_size_vs_list": r["container_bytes"] / base["container_bytes"],
            "iterate_slowdown_vs_list": _mean(base["iterate_items_per_s"])
            / _mean(r["iterate_items_per_s"]),
            "random_read_slowdown_vs_list": _mean(base["random_reads_per_s"])
            / _mean(r["random_reads_per_s"]),
        }
    return out


def print_ratios(table: dict[str, dict[str, float]], results: list[dict[str, Any]]) -> None:
    base = next(r for r in results if r["variant"] == "list")
    for name, row in table.items():
        print(
            f"{name} vs list: worker USS x{row['worker_uss_vs_list']:.3f}, "
            f"total PSS x{row['total_pss_vs_list']:.2f}, "
            f"container x{row['container_size_vs_list']:.2f}; reads slower: "
            f"iterate x{row['iterate_slowdown_vs_list']:.1f}, "
            f"random x{row['random_read_slowdown_vs_list']:.1f}"
        )
    frac = [u / base["container_bytes"] for u in base["worker_uss"]]
    print(
        "plain list: each worker copied "
        + ", ".join(f"{f:.0%}" for f in frac)
        + " of the list by reading it (refcount writes)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2_000_000, help="records (default 2M)")
    parser.add_argument("--workers", type=int, default=2, help="forked workers (default 2)")
    parser.add_argument("--variants", default="list,compact,arrow", help="comma-separated")
    parser.add_argument(
        "--gc-objects",
        type=int,
        default=1_000_000,
        help="gc-tracked objects for the gc hygiene measurement (0: skip it)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        print("this benchmark needs Linux (fork and /proc smaps)", file=sys.stderr)
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(
        f"{args.items} records {{'id', 'name', 'value'}}, {args.workers} forked workers each "
        f"reading all of them, then {RANDOM_READS} random reads "
        f"({ARROW_RANDOM_READS} for arrow); Python {sys.version.split()[0]}\n"
    )
    results = [run_variant(name, args.items, args.workers) for name in names]
    print_table(results)
    print()
    table = ratios(results) if "list" in names else {}
    if table:
        print_ratios(table, results)
    hygiene = run_gc_hygiene(args.gc_objects) if args.gc_objects else None
    if hygiene:
        print(
            f"\ngc hygiene: a forked child runs gc.collect() over the parent's "
            f"{hygiene['objects']} gc-tracked lists ({hygiene['bytes'] / MiB:.0f} MiB); "
            f"child USS growth: {hygiene['without'] / MiB:.1f} MiB without "
            f"forkref.fork_hygiene(), {hygiene['with'] / MiB:.1f} MiB with it"
        )
    if not all(r["checksums_ok"] for r in results):
        print("ERROR: a worker read wrong data", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"results": results, "ratios": table, "gc_hygiene": hygiene}, out, indent=2)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
