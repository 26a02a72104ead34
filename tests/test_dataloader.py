"""A real PyTorch DataLoader over compact containers, under fork, spawn and forkserver.

Shows what the issue asks: every item arrives (shuffled, persistent workers
or not); a worker over 1M small dicts adds under 10% of the private memory
(USS) a plain list adds; nothing is left behind when the container dies,
when a worker is SIGKILLed mid-epoch, or when the parent is SIGKILLed.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import forkref
from conftest import wait_until
from forkref._shm import segments

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
from torch.utils.data import DataLoader, Dataset  # noqa: E402

METHODS = ["fork", "forkserver", "spawn"]


class Records(Dataset):  # type: ignore[type-arg,misc]
    """A map-style dataset over any sequence of records."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def ids_and_pid(batch: list[dict[str, Any]]) -> tuple[list[int], int]:
    return [item["id"] for item in batch], os.getpid()


def records(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "file": f"images/{i:07d}.jpg", "w": 640, "h": 480, "score": i / n}


def _segment_fds(pid: int) -> set[str]:
    directory = os.path.realpath(segments.segment_dir())
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory + "/"):
            found.add(target)
    return found


def _epoch(loader: DataLoader) -> tuple[list[int], set[int]]:  # type: ignore[type-arg]
    ids: list[int] = []
    pids = set()
    for batch_ids, pid in loader:
        ids.extend(batch_ids)
        pids.add(pid)
    return ids, pids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_every_item_arrives_shuffled(method: str, persistent: bool) -> None:
    n = 20_000
    dataset = Records(forkref.compact(records(n)))
    loader = DataLoader(
        dataset,
        batch_size=512,
        shuffle=True,
        num_workers=2,
        collate_fn=ids_and_pid,
        multiprocessing_context=method,
        persistent_workers=persistent,
    )
    for _ in range(2):
        ids, pids = _epoch(loader)
        assert sorted(ids) == list(range(n))
        assert ids != list(range(n))  # shuffled
        assert os.getpid() not in pids
    exported = 0 if method == "fork" else 1  # fork workers inherit; no pickle, no segment
    assert len(_segment_fds(os.getpid())) == exported
    del loader, dataset
    gc.collect()
    assert _segment_fds(os.getpid()) == set()


@pytest.mark.timeout(120)
def test_epochs_without_persistent_workers_reuse_one_segment() -> None:
    dataset = Records(forkref.compact(records(5000)))
    loader = DataLoader(
        dataset, batch_size=1000, num_workers=1, collate_fn=ids_and_pid,
        multiprocessing_context="forkserver",
    )  # fmt: skip
    _epoch(loader)
    segment, fds = dataset.items._layout.segment, _segment_fds(os.getpid())
    for _ in range(6):  # a new worker, and a new pickle of the dataset, per epoch
        ids, _ = _epoch(loader)
        assert len(ids) == 5000
    assert dataset.items._layout.segment is segment
    assert _segment_fds(os.getpid()) == fds


def _worker_uss(items: Any, method: str, step: int) -> int:
    """USS of a persistent DataLoader worker after it read every ``step``-th item."""
    loader = DataLoader(
        Records(items),
        batch_size=1000,
        sampler=range(0, len(items), step),
        num_workers=1,
        collate_fn=_count_and_pid,
        multiprocessing_context=method,
        persistent_workers=True,
    )
    pids = {pid for _, pid in loader}
    (pid,) = pids
    uss = psutil.Process(pid).memory_full_info().uss
    del loader
    gc.collect()
    return int(uss)


def _count_and_pid(batch: list[Any]) -> tuple[int, int]:
    return len(batch), os.getpid()


@pytest.fixture(scope="module")
def million() -> dict[str, Any]:
    n = 1_000_000
    return {"compact": forkref.compact(records(n)), "plain": list(records(n))}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", METHODS)
def test_a_worker_over_a_million_dicts_adds_under_10_percent_of_a_list(
    method: str, million: dict[str, Any]
) -> None:
    step = 7  # every page of the list holds items read: all of it is touched
    empty = _worker_uss(list(records(10)), method, 1)
    compact = _worker_uss(million["compact"], method, step) - empty
    plain = _worker_uss(million["plain"], method, step) - empty
    mib = f"compact {compact / 2**20:.1f} MiB, plain list {plain / 2**20:.1f} MiB"
    print(f"\n{method}: worker USS above an empty worker's: {mib}")
    assert plain > 40 * 2**20, plain  # a list of 1M small dicts costs every worker this
    assert compact < 0.10 * plain, (compact, plain)


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import forkref
    from torch.utils.data import DataLoader
    from test_dataloader import Records, ids_and_pid, records

    victim = sys.argv[1]
    dataset = Records(forkref.compact(records(200_000)))
    loader = DataLoader(dataset, batch_size=100, num_workers=2, collate_fn=ids_and_pid,
                        multiprocessing_context="spawn", shuffle=True)
    for number, (_, pid) in enumerate(loader):
        if number == 3:
            print("workers", " ".join(str(p) for p in psutil_children()), flush=True)
            os.kill(os.getpid() if victim == "parent" else pid, signal.SIGKILL)
    """
).replace(
    "import forkref\n",
    "import forkref, psutil\n"
    "def psutil_children():\n"
    "    return [c.pid for c in psutil.Process().children() if 'resource_tracker' not in "
    "' '.join(c.cmdline())]\n",
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["worker", "parent"])
def test_nothing_left_after_a_sigkill_mid_epoch(victim: str) -> None:
    directory = segments.segment_dir()
    before = set(os.listdir(directory))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, victim],
        capture_output=True,
        env=env,
        cwd=os.path.dirname(__file__),
        timeout=100,
        check=False,
    )
    assert run.returncode != 0  # killed, or the DataLoader saw its worker killed
    if victim == "worker":
        assert b"killed by signal" in run.stderr, run.stderr[-2000:]
    line = run.stdout.decode().split("workers", 1)[1].split()
    workers = [int(pid) for pid in line]
    assert workers

    def gone() -> bool:
        return not any(psutil.pid_exists(p) and _alive(p) for p in workers)

    # The parent's death: each worker notices within its watchdog's 5 s interval.
    assert wait_until(gone, 30)
    assert set(os.listdir(directory)) == before  # anonymous segments: never in the directory


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
