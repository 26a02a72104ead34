"""share() handles in workers that did not inherit the object: resolved through shared memory.

Every behaviour runs under fork, forkserver and spawn, with the stdlib
``multiprocessing.Pool`` and ``ProcessPoolExecutor``: real workers, real
segments. Workers report where the object they received lives (``/proc/self/maps``),
so the tests see zero copy rather than assume it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import forkref
from conftest import wait_until
from forkref._share.handle import _resolve
from forkref._shm import export as _export
from forkref._shm import protocol, serialize
from forkref._shm import segments as _shm
from helpers import frame
from procmaps import mapping_of

pytestmark = pytest.mark.timeout(120)

METHODS = ["fork", "forkserver", "spawn"]
KINDS = ["Pool", "ProcessPoolExecutor"]
MiB = 1 << 20


@contextmanager
def stdlib_pool(kind: str, method: str, workers: int = 2) -> Iterator[Callable[..., list[Any]]]:
    """Yield ``run(fn, items)`` over a stdlib pool of the given kind and start method."""
    ctx = mp.get_context(method)
    if kind == "Pool":
        with ctx.Pool(workers) as pool:
            yield lambda fn, items: pool.map(fn, items, chunksize=1)
            pool.close()
            pool.join()
    else:
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            yield lambda fn, items: list(ex.map(fn, items))


# -- worker functions (module level: spawn workers import them) ---------------


def probe(obj: Any) -> dict[str, Any]:
    """What a worker got: type, identity, content, and where its data lives."""
    arr = obj["f"].to_numpy(copy=False) if isinstance(obj, pd.DataFrame) else obj
    address = arr.__array_interface__["data"][0]
    return {
        "pid": os.getpid(),
        "type": type(obj).__name__,
        "id": id(obj),
        "checksum": float(arr.sum()),
        "mapping": mapping_of(address),
        "writeable": bool(arr.flags.writeable),
    }


def use(obj: Any) -> int:
    return len(obj)


def probe_nested(obj: dict[str, Any]) -> tuple[str, float]:
    inner = obj["inner"]
    return mapping_of(inner.__array_interface__["data"][0]), float(inner.sum())


def worker_anon(arr: np.ndarray) -> tuple[int, float, str]:
    """Private anonymous memory of the worker after reading every page of ``arr``."""
    total = float(arr.sum())  # touch every page
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    return kib * 1024, total, mapping_of(arr.__array_interface__["data"][0])


# -- helpers -------------------------------------------------------------------


def _in_segment(mapping: str) -> bool:
    # An O_TMPFILE segment shows as "/dev/shm/#<inode> (deleted)".
    return mapping.startswith(_shm.segment_dir().rstrip("/") + "/")


class Forged:
    """Pickles like a handle, but to a reference of our choosing."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __reduce__(self) -> tuple[Any, ...]:
        return (_resolve, (self.ref,))




# -- behaviour -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_share_resolves_in_every_start_method(kind: str, method: str) -> None:
    df, arr = frame(8 * 100_000, "f", strings=True), np.arange(300_000, dtype=np.float64)
    handles = [forkref.share(df), forkref.share(arr)]
    before = _export.stats().exports
    with stdlib_pool(kind, method) as run:
        results = run(probe, handles * 4)
    assert [r["type"] for r in results] == ["DataFrame", "ndarray"] * 4
    assert [r["checksum"] for r in results] == [float(df["f"].sum()), float(arr.sum())] * 4
    # Within one worker, every resolution of a share is the same object.
    for kind_name in ("DataFrame", "ndarray"):
        ids: dict[int, set[int]] = {}
        for r in results:
            if r["type"] == kind_name:
                ids.setdefault(r["pid"], set()).add(r["id"])
        assert all(len(s) == 1 for s in ids.values())
    exported = _export.stats().exports - before
    if method == "fork":
        # Inherited: nothing goes through shared memory.
        assert exported == 0
        assert not any(_in_segment(r["mapping"]) for r in results)
        return
    # Serialized once per object however many workers and tasks asked.
    assert exported == 2
    for r in results:
        assert _in_segment(r["mapping"]), r
        assert not r["writeable"]


@pytest.mark.parametrize("kind", KINDS)
def test_late_share_in_a_fork_pool_goes_through_shared_memory(kind: str) -> None:
    before = _export.stats().exports
    with stdlib_pool(kind, "fork") as run:
        run(use, [[1], [2]])  # the workers exist (the executor forks at first submit)
        arr = np.arange(50_000.0)
        results = run(probe, [forkref.share(arr)] * 4)
    assert all(r["checksum"] == float(arr.sum()) for r in results)
    assert all(_in_segment(r["mapping"]) for r in results)
    assert _export.stats().exports - before == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_forged_and_foreign_references_fail_the_task_not_the_pool(kind: str, method: str) -> None:
    handle = forkref.share(np.arange(10.0))
    ref = handle.ref
    forged = Forged(dataclasses.replace(ref, mac=bytes(16)))
    forged_key = Forged(dataclasses.replace(ref, key=bytes(16)))
    foreign = Forged(dataclasses.replace(ref, tree=b"\x01" * 8))
    pickle.dumps(handle)  # the handle leaves this process: it serves from now on
    before = _export.stats().exports
    with stdlib_pool(kind, method) as run:
        for bad, why in [
            (forged, "corrupted or forged"),
            (forged_key, "corrupted or forged"),
            (foreign, "another process tree"),
        ]:
            with pytest.raises(forkref.NotInheritedError, match=why):
                run(use, [bad])
        assert run(use, [handle, [1, 2]]) == [10, 2]  # the pool is healthy
    assert _export.stats().exports - before == 1  # nothing exported for a bad reference


@pytest.mark.parametrize("kind", KINDS)
def test_released_share_is_a_clear_error(kind: str) -> None:
    handle = forkref.share(np.arange(10.0))
    stale = Forged(handle.ref)
    handle.release()
    with stdlib_pool(kind, "spawn") as run:
        with pytest.raises(forkref.NotInheritedError, match="released"):
            run(use, [stale])
        assert run(use, [[1]]) == [1]


class _Unpicklable:
    def __init__(self) -> None:
        self.fn = lambda: 1

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_shared_object_names_the_cause(kind: str) -> None:
    handle = forkref.share(_Unpicklable())
    with stdlib_pool(kind, "spawn") as run:
        with pytest.raises(forkref.NotInheritedError, match="could not pickle it"):
            run(use, [handle])
        assert run(use, [[1]]) == [1]


def test_nested_handles_resolve_inside_an_exported_object() -> None:
    inner = np.arange(1000.0)
    outer = {"inner": forkref.share(inner)}
    with stdlib_pool("Pool", "spawn") as run:
        (mapping, total), *_ = run(probe_nested, [forkref.share(outer)])
    assert _in_segment(mapping)
    assert total == float(inner.sum())


def test_spawn_worker_holds_no_private_copy() -> None:
    # Not USS: pages of a segment mapped by one process alone count in its
    # USS. RssAnon is private anonymous memory only, where a copy would land.
    arr = np.ones(256 * MiB // 8)
    with stdlib_pool("Pool", "spawn") as run:
        results = run(worker_anon, [forkref.share(arr)] * 2)
    for anon, total, mapping in results:
        assert total == arr.size
        assert _in_segment(mapping), mapping  # the array's data lies in the segment
        # A private copy would add >= 256 MiB; the interpreter with numpy
        # and pandas stays well under half of it.
        assert anon < arr.nbytes // 2, anon


def test_release_drops_the_export() -> None:
    gc.collect()  # handles of earlier tests die, and their exports are pruned
    assert wait_until(lambda: _export.stats().live_exports == 0, seconds=20)
    base = 0
    handle = forkref.share(np.arange(100_000.0))
    with stdlib_pool("Pool", "spawn") as run:
        run(probe, [handle])
    assert _export.stats().live_exports == base + 1
    handle.release()
    assert wait_until(lambda: _export.stats().live_exports == base, seconds=20)


@pytest.mark.smoke
def test_export_in_a_too_small_directory_fails_the_task_clearly(small_tmpfs: str) -> None:
    handle = forkref.share(np.ones(2 * MiB))
    with stdlib_pool("Pool", "spawn", workers=1) as run:
        with pytest.raises(forkref.SharedMemoryFullError) as info:
            run(use, [handle])
        assert run(use, [[1]]) == [1]
    message = str(info.value)
    assert "not forked from the sharing process" not in message.split("stand in:")[1]
    assert "needs" in message
    assert "--shm-size" in message
    assert "FORKREF_SHM_DIR" in message
    assert os.listdir(small_tmpfs) == []


def test_sharing_process_resolves_its_own_handle_without_export() -> None:
    arr = np.arange(10.0)
    handle = forkref.share(arr)
    import pickle

    before = _export.stats().exports
    assert pickle.loads(pickle.dumps(handle)) is arr
    assert _export.stats().exports == before


_FORK_PROBE = """
import json, os, pickle, sys, threading, warnings
import forkref
from forkref._shm import export as _export

def names():
    return {t.name for t in threading.enumerate()}

def fork_and_check_child():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pid = os.fork()
        if pid == 0:
            os._exit(0 if "forkref-export" not in names() and not _export._server else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child inherited the export thread"
    return [str(w.message) for w in caught if "fork" in str(w.message)]

handle = forkref.share({"a": 1})
pickle.dumps(handle)  # a reference leaves the process: the export thread runs
assert "forkref-export" in names()
os_threads = len(os.listdir("/proc/self/task"))
plain = [fork_and_check_child() for _ in range(10)]
assert "forkref-export" in names(), "not restarted after a fork"
with _export.paused():
    assert "forkref-export" not in names()
    in_pause = [fork_and_check_child() for _ in range(10)]
assert "forkref-export" in names(), "not restarted after paused()"
print(json.dumps({"os_threads": os_threads, "plain": plain, "in_pause": in_pause}))
"""


@pytest.mark.smoke
def test_export_thread_is_stopped_across_fork_and_restarted() -> None:
    import json
    import subprocess
    import sys

    # A fresh interpreter without numpy: CPython's fork warning counts OS
    # threads, and a BLAS thread pool would count too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", _FORK_PROBE], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["os_threads"] == 2  # the main thread and the export thread
    # 3.12+ warns when fork() runs while other threads exist. Inside paused()
    # ours does not; a plain fork restarts it inside os.fork(), which 3.13
    # counts (it checks after the at-fork hooks), 3.12 does not.
    assert report["in_pause"] == [[]] * 10
    if sys.version_info < (3, 13):
        assert report["plain"] == [[]] * 10


def id_and_fetches(obj: Any) -> tuple[int, int, int]:
    return id(obj), _export.stats().fetches, len(obj["rows"])


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_plain_python_object_is_rebuilt_once_per_worker(method: str) -> None:
    obj = {"rows": [{"id": i, "name": str(i)} for i in range(50_000)]}
    before = _export.stats().exports
    with stdlib_pool("Pool", method, workers=1) as run:
        seen = run(id_and_fetches, [forkref.share(obj)] * 5)
    assert {s[2] for s in seen} == {50_000}
    assert len({s[0] for s in seen}) == 1  # one object for every task
    assert {s[1] for s in seen} == {1}  # fetched and deserialized once
    assert _export.stats().exports - before == 1


# -- faults: who answers, and a server that keeps serving --------------------------
#
# These run real programs in fresh interpreters: a sharer, a squatter on its
# address, a worker that did not inherit anything (no tree secret).

_SHARER = """
import json, pickle, sys
import forkref
from forkref._shm import protocol
h = forkref.share({"payload": list(range(10))})
data = pickle.dumps(h)
print(json.dumps({"handle": data.hex(),
                  "address": protocol.address(h.ref.tree, h.ref.origin_pid).encode().hex()}))
"""

_WORKER = """
import pickle, sys
import forkref
obj = pickle.loads(bytes.fromhex(sys.stdin.read()))
try:
    print(len(obj))
except forkref.NotInheritedError as err:
    print("NotInheritedError:", err)
"""

# Pure stdlib: it may run as another user, with the system's python.
_SQUATTER = """
import json, socket, sys
address, fd, size = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(address)
srv.listen(1)
print("listening", flush=True)
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(10)
try:
    conn.recv(4096)
    socket.send_fds(conn, [json.dumps({"size": size}).encode() + b"\\n"], [fd])
except OSError:
    pass
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _python(code: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of its own session (killed whole on timeout)."""
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class _RunsOnUnpickle:
    """A payload that creates a directory when unpickled: proof that it was."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def _squatter_command(as_other_user: bool) -> tuple[list[str], dict[str, Any]]:
    if not as_other_user:
        return [sys.executable, "-c", _SQUATTER], {}
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.getuid() != 0 or system_python is None:
        pytest.skip("needs root and a system python3 to run a process as another user")
    return [system_python, "-c", _SQUATTER], {"user": 65534, "group": 65534}


@pytest.mark.smoke
@pytest.mark.parametrize("as_other_user", [False, True], ids=["same-user", "uid-65534"])
def test_worker_refuses_a_squatter_on_the_address_of_an_exited_sharer(
    tmp_path: Path, as_other_user: bool
) -> None:
    command, user = _squatter_command(as_other_user)
    shared = json.loads(_python(_SHARER).stdout)  # shared, pickled, and exited
    marker = str(tmp_path / "unpickled-the-squatters-payload")
    plan = serialize.plan(_RunsOnUnpickle(marker))
    fd = _shm.create_anonymous(plan.size, "a squatter's payload")
    try:
        serialize.write(plan, fd, "a squatter's payload")
        with subprocess.Popen(
            [*command, shared["address"], str(fd), str(plan.size)],
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=[fd],
            **user,
        ) as squatter:
            assert squatter.stdout is not None
            assert squatter.stdout.readline() == "listening\n"
            worker = _python(_WORKER, stdin=shared["handle"])
            squatter.wait(timeout=60)
    finally:
        os.close(fd)
    assert not os.path.exists(marker), "the worker unpickled what the squatter sent"
    assert worker.stdout.startswith("NotInheritedError:"), worker
    assert "not the sharing process" in worker.stdout
    assert f"pid {squatter.pid}" in worker.stdout


_NOBODY_CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(bytes.fromhex(sys.argv[1]))
try:
    sock.sendall(sys.argv[2].encode() + b"\\n")
except BrokenPipeError:
    pass  # refused before the request was read: the reply is already here
data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
print(json.dumps({"reply": data.decode(), "fds": len(fds)}))
"""


def _request_line(ref: Any) -> str:
    from forkref._shm.protocol import request_line

    return request_line(ref).decode().rstrip("\n")


def test_sharing_process_refuses_another_users_request() -> None:
    command, user = _squatter_command(as_other_user=True)
    handle = forkref.share(np.arange(1000.0))
    pickle.dumps(handle)  # serving now
    address = protocol.address(handle.ref.tree, handle.ref.origin_pid).encode().hex()
    before = _export.stats()
    done = subprocess.run(
        [command[0], "-c", _NOBODY_CLIENT, address, _request_line(handle.ref)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **user,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["fds"] == 0
    assert "refusing to export" in answer["reply"]
    assert "(uid 65534)" in answer["reply"]
    assert _export.stats().exports == before.exports  # nothing was serialized for it


_FORKING_EXPORT = """
import multiprocessing as mp, os, threading, warnings
import forkref

class ForksWhenPickled:
    def __reduce__(self):
        pid = os.fork()  # from the export thread, while it exports this object
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return (dict, ())

class ExitsWhenPickled:
    def __reduce__(self):
        raise SystemExit("raised while exporting")

def size(obj):
    try:
        return len(obj)
    except forkref.NotInheritedError as err:
        return str(err)

if __name__ == "__main__":
    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with two threads
    forking = forkref.share(ForksWhenPickled())
    exiting = forkref.share(ExitsWhenPickled())
    plain = forkref.share({"a": 1, "b": 2})
    with mp.get_context("spawn").Pool(1) as pool:
        print(pool.apply(size, (forking,)))
        print(pool.apply(size, (exiting,)))
        print(pool.apply(size, (plain,)))
    print([t.name for t in threading.enumerate()].count("forkref-export"))
"""


@pytest.mark.smoke
def test_export_thread_survives_a_fork_and_a_system_exit_from_an_exported_object(
    tmp_path: Path,
) -> None:
    script = tmp_path / "forking_export.py"  # a file: spawn workers import __main__
    script.write_text(_FORKING_EXPORT)
    done = _python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    assert done.returncode == 0, done.stderr
    forked, exited, plain, threads = done.stdout.splitlines()
    assert forked == "0"
    assert "failed to export" in exited
    assert "raised while exporting" in exited
    assert plain == "2"  # still served: the thread did not die
    assert threads == "1"  # one export thread, not two
    assert "Exception ignored" not in done.stderr


_FORK_IN_PAUSE = """
import os, pickle, subprocess, sys
import forkref
from forkref._shm import export as _export
WORKER = sys.stdin.read()
pickle.dumps(forkref.share({"x": 1}))  # the parent serves
with _export.paused():
    pid = os.fork()
    if pid == 0:  # like a pool worker forked by forkref, which shares in turn
        handle = forkref.share({"child": [1, 2, 3]})
        data = pickle.dumps(handle).hex()
        try:
            out = subprocess.run([sys.executable, "-c", WORKER], input=data,
                                 capture_output=True, text=True, timeout=30).stdout
        except subprocess.TimeoutExpired:
            out = "the child's worker hung\\n"
        os.write(1, out.encode())
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.mark.smoke
def test_child_forked_inside_paused_serves_its_own_shares() -> None:
    done = _python(_FORK_IN_PAUSE, stdin=_WORKER)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n", done.stdout  # len({"child": ...})


_FORK_HOLDS_LOCK = """
import os, pickle, threading
import forkref
from forkref._shm import export as _export
seen = []
def probe():
    # Runs after forkref's before-fork hook (registered later, run earlier).
    box = []
    t = threading.Thread(target=lambda: box.append(_export._server_lock.acquire(blocking=False)))
    t.start(); t.join()
    if box[0]:
        _export._server_lock.release()
    seen.append(box[0])
os.register_at_fork(before=probe)
pickle.dumps(forkref.share({"x": 1}))  # forkref registers its hooks now
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(seen, _export._server_lock.acquire(blocking=False))
"""


def test_fork_holds_the_server_lock_from_before_to_after() -> None:
    done = _python(_FORK_HOLDS_LOCK)
    assert done.returncode == 0, done.stderr
    # Held across the fork (another thread cannot take it), free afterwards.
    assert done.stdout.split() == ["[False]", "True"], done.stdout


_REQUEST_CLIENT = """
import json, os, sys
from forkref._shm import protocol
from forkref._shm import client
f = json.loads(sys.argv[1])
ref = protocol.parse_request(sys.argv[1].encode())
results = []
for _ in range(int(sys.argv[2])):
    link = client._Link()
    before = len(os.listdir("/proc/self/fd"))
    try:
        reply, fds = client._ask(link, ref)
    except client.FetchError as err:
        link.close()
        results.append({"error": str(err), "leaked": len(os.listdir("/proc/self/fd")) - before})
    else:
        results.append({"inheritable": [os.get_inheritable(fd) for fd in fds],
                        "size": reply["size"]})
        for fd in fds:
            os.close(fd)
        link.close()
print(json.dumps(results))
"""


def test_received_segment_descriptor_is_close_on_exec() -> None:
    handle = forkref.share(np.arange(1000.0))
    pickle.dumps(handle)
    done = _python(
        _REQUEST_CLIENT.replace("sys.argv[1]", repr(_request_line(handle.ref))).replace(
            "sys.argv[2]", "'1'"
        )
    )
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["inheritable"] == [False, False]  # the segment and the board
    assert result["size"] > 8000


def test_malformed_replies_close_the_descriptors_they_carry() -> None:
    import threading

    from forkref._refs.registry import Reference

    # A server at an address of this process (so the peer check passes) that
    # answers with garbage plus a descriptor.
    ref = Reference(os.urandom(8), bytes(16), os.getpid(), "builtins.dict", bytes(16))
    replies = [b"not json\n", b'{"nosize": 1}\n', b'["a list"]\n', b'{"size": 1}']
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(protocol.address(ref.tree, ref.origin_pid))
        srv.listen(4)
        srv.settimeout(60)

        def serve() -> None:
            r, w = os.pipe()
            try:
                for reply in replies:
                    conn, _ = srv.accept()
                    with conn:
                        conn.recv(4096)
                        socket.send_fds(conn, [reply], [r, w] if reply.startswith(b"[") else [r])
            finally:
                os.close(r)
                os.close(w)

        server = threading.Thread(target=serve)
        server.start()
        done = _python(
            _REQUEST_CLIENT.replace("sys.argv[1]", repr(_request_line(ref))).replace(
                "sys.argv[2]", repr(str(len(replies)))
            )
        )
        server.join(60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["leaked"] for r in results] == [0] * len(replies), results
    assert all("malformed" in r["error"] or "truncated" in r["error"] for r in results), results


_RESTART = """
import os, pickle, subprocess, sys, threading
import forkref
from forkref._shm import export as _export
WORKER = sys.stdin.read()
first = forkref.share({"x": 1})
pickle.dumps(first)
_export._server.stop()  # the thread is gone, as if it had died
assert "forkref-export" not in {t.name for t in threading.enumerate()}
second = forkref.share([1, 2])
data = pickle.dumps(second).hex()  # pickling a handle brings it back
print(subprocess.run([sys.executable, "-c", WORKER], input=data, capture_output=True,
                     text=True, timeout=30).stdout, end="")
"""


def test_pickling_a_handle_restarts_a_stopped_export_thread() -> None:
    done = _python(_RESTART, stdin=_WORKER)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\n"
