"""The shared-memory route over time: exported once, dropped by workers, freed, never stuck.

Real spawn pools and real segments. Where segment-directory use is measured,
the test mounts a private tmpfs (needs root; skipped otherwise) so that the
figures are this test's alone.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest

import forkref
from conftest import mounted_tmpfs, wait_until
from forkref._shm import export as _export
from forkref._shm import protocol
from helpers import total

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
SPAWN = __import__("multiprocessing").get_context("spawn")




@pytest.fixture
def tmpfs_64m(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private 64 MiB tmpfs as the segment directory (Docker's default /dev/shm size)."""
    with mounted_tmpfs("64m", monkeypatch) as path:
        yield path


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# -- worker functions (module level: spawn workers import them) -----------------------


class Row:
    """A picklable, weakref-able plain object (rebuilt by unpickling, not zero-copy)."""

    def __init__(self, n: int) -> None:
        self.items = list(range(n))


def size_of(row: Row) -> int:
    return len(row.items)


def worker_state(arr: np.ndarray) -> dict[str, float]:
    return {
        "first": float(arr[0]),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss": psutil.Process().memory_info().rss,
    }


_KEPT: Any = None
_WEAK: Any = None


def take(arr: np.ndarray, keep: bool) -> int:
    """Remember the object: strongly (a task still using it) or weakly."""
    global _KEPT, _WEAK
    _KEPT = arr if keep else None
    _WEAK = weakref.ref(arr)
    return len(os.listdir("/proc/self/fd"))


def between_tasks() -> dict[str, Any]:
    """What forkref's worker loop does before a task, then what is left."""
    _export.before_task()
    gc.collect()
    held = _KEPT
    return {
        "cached": _export.stats().cached,
        "dropped": _export.stats().dropped,
        "alive": _WEAK() is not None,
        "intact": bool(held is not None and float(held.sum()) == float(held.size)),
        "fds": len(os.listdir("/proc/self/fd")),
    }


# -- export once per object ---------------------------------------------------------------


def test_three_maps_export_each_object_once() -> None:
    a, b = Row(1000), Row(2000)
    before = _export.stats().exports
    with SPAWN.Pool(2) as pool:
        for _ in range(3):
            # Inline handles: they die when map() returns. The export stays
            # with its object, for the next map.
            assert pool.map(size_of, [forkref.share(a), forkref.share(b)], chunksize=1) == [
                1000,
                2000,
            ]
        assert _export.stats().exports - before == 2  # one per object, not one per map
        assert _export.stats().dormant_exports >= 2
    # The pool closed: its workers are gone, and so are the exports they held.
    assert wait_until(lambda: _export.stats().live_exports == 0), _export.stats()


def test_an_export_goes_when_its_object_dies() -> None:
    gc.collect()
    assert wait_until(lambda: _export.stats().live_exports == 0), _export.stats()
    with SPAWN.Pool(1) as pool:
        row = Row(10)
        assert pool.apply(size_of, (forkref.share(row),)) == 10
        assert _export.stats().live_exports == 1  # dormant: the worker may need it again
        del row
        gc.collect()
        assert _export.stats().live_exports == 0  # the object died: its segment too


def test_release_frees_the_export_at_once_and_workers_drop_their_copy() -> None:
    arr = np.ones(MiB // 8)
    with SPAWN.Pool(1) as pool:
        handle = forkref.share(arr)
        fds_holding = pool.apply(take, (handle, False))
        handle.release()
        assert _export.stats().live_exports == 0
        after = pool.apply(between_tasks)
    assert after["cached"] == 0
    assert after["dropped"] >= 1
    assert not after["alive"]  # the worker's copy is gone, with its mapping
    assert after["fds"] <= fds_holding - 1 or sys.version_info >= (3, 13)


def test_a_worker_never_loses_an_object_a_task_still_holds() -> None:
    arr = np.ones(MiB // 8)
    with SPAWN.Pool(1) as pool:
        with forkref.share(arr) as handle:
            pool.apply(take, (handle, True))
        after = pool.apply(between_tasks)
    assert after["cached"] == 0  # dropped from the cache...
    assert after["alive"]  # ...but the task's reference keeps it alive
    assert after["intact"]  # and readable: nothing was unmapped under it


# -- flat over many cycles ------------------------------------------------------------------


def cycles(count: int, style: str, directory: str) -> list[dict[str, float]]:
    """Share, resolve in a spawn worker, release; ``count`` times. Samples at 20 and the end."""
    samples = []
    with SPAWN.Pool(1) as pool:
        for i in range(count):
            arr = np.full(MiB // 8, float(i))  # a new 1 MiB array every cycle
            if style == "release":
                with forkref.share(arr) as handle:
                    state = pool.apply(worker_state, (handle,))
            else:  # the inline handle and the array just die
                state = pool.apply(worker_state, (forkref.share(arr),))
            assert state["first"] == float(i)
            assert _export.stats().live_exports <= 2
            if i in (20, count - 1):
                samples.append({**state, "used": used_bytes(directory)})
            del arr
    return samples


@pytest.mark.parametrize("style", ["release", "drop"])
def test_a_thousand_cycles_stay_flat_in_a_64mib_directory(tmpfs_64m: str, style: str) -> None:
    start, end = cycles(1000, style, tmpfs_64m)
    # Without dropping, each cycle kept 1 MiB of tmpfs, one fd and the
    # mapping's pages in the worker: +980 fds, +980 MiB, a full directory
    # at cycle 63. Now a cycle's object goes before the next one comes.
    assert end["fds"] <= start["fds"] + 2, (start, end)
    assert end["rss"] <= start["rss"] + 32 * MiB, (start, end)
    assert end["used"] <= start["used"] + 2 * MiB, (start, end)
    assert used_bytes(tmpfs_64m) <= 2 * MiB


# -- the export thread serves everyone ---------------------------------------------------


def test_idle_connections_do_not_delay_another_workers_fetch() -> None:
    arr = np.arange(1000.0)
    handle = forkref.share(arr)
    pickle.dumps(handle)  # serving now
    address = protocol.address(handle.ref.tree, handle.ref.origin_pid)
    idle = []
    for i in range(12):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        if i % 3 == 0:
            sock.sendall(b'{"tree": ')  # half a request, then silence
        idle.append(sock)
    try:
        with SPAWN.Pool(1) as pool:
            assert pool.apply(total, (handle,)) == float(arr.sum())
        # A server that served connections one after the other would have had
        # to give up on each idle one (and close it) before answering the
        # worker. These were never waited for: still open, sent nothing.
        for sock in idle[1::3]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in idle:
            sock.close()


# -- fds, users, and the engine's API --------------------------------------------------------

_FD_LIMIT_WORKER = """
import os, pickle, resource, sys
import forkref
data = bytes.fromhex(sys.stdin.read())
headroom = int(sys.argv[1])
highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + headroom, hard))
obj = pickle.loads(data)
try:
    print("resolved", len(obj))
except forkref.Error as err:
    print(type(err).__name__, err)
"""


def _run(code: str, args: list[str], stdin: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.update(kwargs.pop("env", {}))
    with subprocess.Popen(
        [kwargs.pop("python", sys.executable), "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    ) as proc:
        try:
            out, err = proc.communicate(stdin, timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("headroom", [0, 1, 2])
def test_a_worker_at_its_fd_limit_is_told_so(headroom: int) -> None:
    handle = forkref.share(np.arange(100.0))
    data = pickle.dumps(handle).hex()
    done = _run(_FD_LIMIT_WORKER, [str(headroom)], data)
    assert done.returncode == 0, done.stderr
    # 0: no socket; 1: the socket, but no room for the descriptors it is
    # sent; 2: the segment arrives, mapping it needs one more.
    assert done.stdout.startswith("SharedMemoryError"), done.stdout
    assert "limit of open files" in done.stdout
    assert "ulimit -n" in done.stdout
    assert "carried 0 segments" not in done.stdout


_OTHER_USER_WORKER = """
import pickle, sys
import forkref
obj = pickle.loads(bytes.fromhex(sys.stdin.read()))
try:
    print("resolved", len(obj))
except forkref.Error as err:
    print(type(err).__name__, err)
"""


def test_a_worker_of_another_user_is_told_why() -> None:
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.getuid() != 0 or system_python is None:
        pytest.skip("needs root and a system python3 to run a worker as another user")
    version = subprocess.run(
        [system_python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip("the system python3 cannot load this interpreter's extension modules")
    handle = forkref.share(np.arange(100.0))
    data = pickle.dumps(handle).hex()
    src = os.path.dirname(os.path.dirname(forkref.__file__))
    path = os.pathsep.join([src, sysconfig.get_paths()["purelib"]])
    done = _run(
        _OTHER_USER_WORKER,
        [],
        data,
        python=system_python,
        env={"PYTHONPATH": path},
        user=65534,
        group=65534,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("NotInheritedError"), done.stdout
    assert f"runs as uid {os.getuid()} and this process as uid 65534" in done.stdout
    assert "Run the workers as the user that shares the object." in done.stdout
    assert "no longer serves" not in done.stdout


_DEFERRED = """
import json, os, pickle, select, subprocess, sys, threading
import forkref
from forkref._shm import export as _export
WORKER = sys.stdin.read()
names = lambda: {t.name for t in threading.enumerate()}
handle = forkref.share({"a": 1, "b": 2})
report = {"before": _export.listener_fd()}
with _export.deferred():  # as forkref's pools pickle tasks
    data = pickle.dumps(handle)
report["thread_after_pickling"] = "forkref-export" in names()
fd = _export.listener_fd()
report["listening"] = fd is not None
worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
worker.stdin.write(data.hex())
worker.stdin.close()
poller = select.poll()
poller.register(fd, select.POLLIN)
report["knocked"] = bool(poller.poll(60_000))  # the dispatcher's poll
_export.serve_pending()
report["thread_after_serve"] = "forkref-export" in names()
report["listener_after_serve"] = _export.listener_fd()
report["worker"] = worker.stdout.read().strip()
worker.wait()
print(json.dumps(report))
"""


def test_deferred_handles_start_the_export_thread_only_when_a_worker_asks() -> None:
    done = _run(_DEFERRED, [], _OTHER_USER_WORKER)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {
        "before": None,
        "thread_after_pickling": False,
        "listening": True,
        "knocked": True,
        "thread_after_serve": True,
        "listener_after_serve": None,
        "worker": "resolved 2",
    }
