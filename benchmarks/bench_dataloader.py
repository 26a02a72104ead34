"""A PyTorch DataLoader over 2M annotation records: plain list vs numpy-serialized vs compact().

The three ways to hold a big list of small dicts for DataLoader workers:

* ``list``: the plain list. Forked workers copy every page they read (the
  refcount writes, copy-on-read); spawned workers each unpickle a full copy.
* ``numpy-serialized``: each record pickled into one numpy byte array plus an
  int64 array of end offsets, written here after detectron2's
  ``NumpySerializedList`` (``detectron2/data/common.py``), the workaround the
  PyTorch DataLoader memory issue (pytorch/pytorch#13246) points to. Forked
  workers share it; spawned workers each receive a pickled copy of the arrays.
* ``compact``: ``forkref.compact(records)``, by column; spawned workers map
  one shared segment.

Each (start method, container) pair runs in a fresh process, so containers
do not disturb each other. There, the container is built once, then each
round is one epoch of a new ``DataLoader(shuffle=True, persistent_workers=
False, batch_size=64, default collate)``:

* epoch time: from ``iter(loader)`` to the last batch (worker start-up
  included, as every epoch pays it without persistent workers);
* start-up time: from ``iter(loader)`` to the first batch;
* worker USS and PSS (mean over the workers) and total PSS (parent and
  workers), sampled when the last batch arrives, workers still alive.

Medians over rounds, with [min-max]; ratios against the plain list.

    python benchmarks/bench_dataloader.py                    # 2M records, 4 workers, 3 rounds
    python benchmarks/bench_dataloader.py --records 200000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

import forkref

MiB = 2**20
CONTAINERS = ["list", "numpy-serialized", "compact"]


def records(n: int) -> Iterator[dict[str, Any]]:
    """COCO-like annotation records: the usual detection dataset's list of dicts."""
    for i in range(n):
        yield {
            "image_id": i,
            "file_name": f"train2017/{i:012d}.jpg",
            "height": 480 + i % 7,
            "width": 640,
            "category_id": i % 80,
            "bbox": [i % 600 * 1.0, i % 400 * 1.0, 32.5, 48.0],
        }


class NumpySerializedList:
    """detectron2's NumpySerializedList, as written there: pickles in one uint8 array."""

    def __init__(self, items: Any) -> None:
        blobs = [np.frombuffer(pickle.dumps(x, protocol=-1), dtype=np.uint8) for x in items]
        self._addr = np.cumsum(np.asarray([len(b) for b in blobs], dtype=np.int64))
        self._lst = np.concatenate(blobs)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, idx: int) -> Any:
        start = 0 if idx == 0 else self._addr[idx - 1].item()
        end = self._addr[idx].item()
        return pickle.loads(memoryview(self._lst[start:end]))


class Records(Dataset):  # type: ignore[type-arg]
    """The user's map-style dataset: the same for every container."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def build(container: str, n: int) -> Any:
    if container == "list":
        return list(records(n))
    if container == "numpy-serialized":
        return NumpySerializedList(list(records(n)))
    return forkref.compact(records(n))


def _memory(pids: list[int]) -> tuple[float, float, float]:
    """(mean worker USS, mean worker PSS, total PSS with this process), in MiB."""
    infos = [psutil.Process(pid).memory_full_info() for pid in pids]
    uss = statistics.mean(i.uss for i in infos) / MiB
    pss = statistics.mean(i.pss for i in infos) / MiB
    total = (sum(i.pss for i in infos) + psutil.Process().memory_full_info().pss) / MiB
    return uss, pss, total


def one_epoch(dataset: Records, method: str, workers: int, batch: int) -> dict[str, float]:
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        multiprocessing_context=method,
        persistent_workers=False,
    )
    batches = len(loader)
    start = time.perf_counter()
    iterator = iter(loader)
    first = 0.0
    for number in range(batches):
        next(iterator)
        if number == 0:
            first = time.perf_counter() - start
    epoch = time.perf_counter() - start
    # Sampled after the clock stops, while the workers are still alive.
    uss, pss, total = _memory([w.pid for w in iterator._workers])  # type: ignore[attr-defined]
    for _ in iterator:  # the end of the epoch: the workers are shut down
        pass
    return {"epoch": epoch, "startup": first, "uss": uss, "pss": pss, "total_pss": total}


def run_one(args: argparse.Namespace) -> None:
    """In a fresh process: build one container, run the rounds, print JSON."""
    torch.set_num_threads(1)
    began = time.perf_counter()
    dataset = Records(build(args.container, args.records))
    built = time.perf_counter() - began
    rounds = [one_epoch(dataset, args.method, args.workers, args.batch) for _ in range(args.rounds)]
    print(json.dumps({"build": built, "rounds": rounds}))


def _spread(values: list[float], digits: int) -> str:
    median = statistics.median(values)
    return f"{median:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def report(method: str, results: dict[str, Any]) -> None:
    print(f"\n== start method {method!r} ==")
    header = (
        f"{'container':<17} {'epoch s':>19} {'start-up s':>19} {'worker USS MiB':>20} "
        f"{'worker PSS MiB':>20} {'total PSS MiB':>15} {'build s':>8}"
    )
    print(header)
    for name in CONTAINERS:
        rounds = results[name]["rounds"]
        column = {key: [r[key] for r in rounds] for key in rounds[0]}
        print(
            f"{name:<17} {_spread(column['epoch'], 2):>19} {_spread(column['startup'], 2):>19} "
            f"{_spread(column['uss'], 1):>20} {_spread(column['pss'], 1):>20} "
            f"{statistics.median(column['total_pss']):>15.0f} {results[name]['build']:>8.1f}"
        )
    plain = results["list"]["rounds"]
    for name in CONTAINERS[1:]:
        mine = results[name]["rounds"]
        # Ratios round by round (round i of each against round i of the list): their spread.
        epoch = [m["epoch"] / p["epoch"] for m, p in zip(mine, plain, strict=True)]
        start = [m["startup"] / p["startup"] for m, p in zip(mine, plain, strict=True)]
        uss = [m["uss"] / p["uss"] for m, p in zip(mine, plain, strict=True)]
        print(
            f"{name} / list: epoch time {_spread(epoch, 2)}x, start-up {_spread(start, 2)}x, "
            f"worker USS {_spread(uss, 2)}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default="fork,spawn")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "CONTAINER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.method, args.container = args.one
        run_one(args)
        return
    print(
        f"bench_dataloader: {args.records} records, {args.workers} workers, batch {args.batch}, "
        f"{args.rounds} rounds; torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start"
    )
    common = ["--records", str(args.records), "--workers", str(args.workers)]
    common += ["--rounds", str(args.rounds), "--batch", str(args.batch)]
    for method in args.methods.split(","):
        results = {}
        for name in CONTAINERS:
            out = subprocess.run(
                [sys.executable, __file__, *common, "--one", method, name],
                capture_output=True,
                check=True,
                text=True,
            ).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
        report(method, results)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
