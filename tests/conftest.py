"""Test-session set-up: each session is isolated, and every test cleans up after itself.

One session (``pytest_configure`` .. ``pytest_unconfigure``):

* gets a segment directory of its own, a fresh directory under ``/dev/shm``
  (a tmpfs), exported as ``FORKREF_SHM_DIR`` before any test runs, so every
  process the suite starts (fork, forkserver and spawn workers, scripts run
  with ``subprocess``) writes its segments there and nowhere else;
* marks the processes it starts with ``FORKREF_TEST_SESSION=<random token>``
  in their environment, so its processes are told apart from those of another
  session on the same machine even once they are orphans in a session of
  their own (janitors, a timed-out script's workers);
* kills what is left of its processes and removes its directory at the end,
  also after a failure, a timeout or Ctrl-C.

Each test (:func:`no_leftovers`) must leave no process of the session and no
entry in the session's segment directory. Nothing here looks at machine-wide
state: another run of the suite beside this one changes no outcome.

A fork made while another thread runs fails the test that made it (Python
3.12+ warns about it; see "forks from a multi-threaded process" below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkref._shm import segments as _shm

SESSION_ENV = "FORKREF_TEST_SESSION"
# pyarrow (imported with pandas) runs jemalloc with a background thread: a
# native thread in this process, so Python 3.12+ warns at every stdlib fork
# the tests make, and a warning caused by forkref's own threads would drown.
# jemalloc reads it when pyarrow loads: during collection, after pytest_configure.
_JEMALLOC_ENV = ("JE_ARROW_MALLOC_CONF", "background_thread:false")
# Long-lived helpers the stdlib starts once per interpreter (this one's only).
_STDLIB_HELPERS = ("forkserver", "resource_tracker", "semaphore_tracker")
_FORK_WARNING = re.compile(r"is multi-threaded, use of fork\(\) may lead to deadlocks")

_session: dict[str, str] = {}  # token, pytest's start time, dir, the environment it replaced


class MultiThreadedForkError(AssertionError):
    """A test forked while another thread ran (Python 3.12+'s DeprecationWarning)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "forks_with_threads: the test forks beside its own threads on purpose"
    )
    parent = os.environ.get(_shm.ENV_DIR) or "/dev/shm"
    directory = tempfile.mkdtemp(prefix=f"forkref-tests-{os.getpid()}-", dir=parent)
    _session.update(
        token=secrets.token_hex(8),
        started=str(_stat(os.getpid())[1]),
        dir=directory,
        old_dir=os.environ.get(_shm.ENV_DIR, ""),
        old_token=os.environ.get(SESSION_ENV, ""),
    )
    os.environ[_shm.ENV_DIR] = directory
    # Appended to an outer session's tokens (a test running pytest), so the
    # outer session still recognizes what the inner one leaves.
    outer = _session["old_token"]
    os.environ[SESSION_ENV] = f"{outer}:{_session['token']}" if outer else _session["token"]
    os.environ.setdefault(*_JEMALLOC_ENV)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Ray modules last, keeping the order otherwise.

    They start Ray in this process, and ray.shutdown() leaves its driver's
    gRPC threads running here: a fork in any later test is a fork beside
    them (Python 3.12+ warns), and stdlib fork pools made after them hung on
    3.13 (a child inherits a lock one of them held).
    """
    items.sort(key=lambda item: item.path.name.startswith("test_ray"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _session:
        return
    left = _kill(_session_processes())  # after Ctrl-C, or a teardown that was cut short
    if left:
        print(f"forkref tests: killed processes left at the end: {left}", file=sys.stderr)
    shutil.rmtree(_session["dir"], ignore_errors=True)
    for name, old in ((_shm.ENV_DIR, _session["old_dir"]), (SESSION_ENV, _session["old_token"])):
        if old:
            os.environ[name] = old
        else:
            os.environ.pop(name, None)
    _session.clear()


# -- processes of this session ---------------------------------------------------


def _stat(pid: int | str) -> tuple[int, int]:
    """(parent pid, start time in clock ticks since boot) from /proc/pid/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def _session_pids(token: str, since: int) -> set[int]:
    """pytest's descendants, and processes started since ``since`` that carry ``token``.

    Forked children keep pytest's original environment (without the token);
    exec'd ones may leave the tree (orphans, new sessions) but keep the token.
    """
    parent_of, started = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
                parent_of[int(entry.name)], started[int(entry.name)] = _stat(entry.name)
    ours: set[int] = set()
    parents = {os.getpid()}
    while parents:
        parents = {pid for pid, ppid in parent_of.items() if ppid in parents} - ours
        ours |= parents
    for pid in [p for p, t in started.items() if t >= since and p not in ours]:
        # Only processes younger than pytest: reading the environment of a
        # busy process can block on its memory map.
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as env:
            if _carries(env.read(), token):
                ours.add(pid)
    ours.discard(os.getpid())
    return ours


def _carries(environ: bytes, token: str) -> bool:
    """Whether a /proc/pid/environ block has ``token`` among its session tokens."""
    for entry in environ.split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name == SESSION_ENV.encode():
            return token.encode() in value.split(b":")
    return False


def _session_processes() -> list[psutil.Process]:
    """Live processes of this session except pytest and its own stdlib helpers."""
    procs = []
    for pid in _session_pids(_session["token"], int(_session["started"])):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    return [p for p in procs if _counts(p, os.getpid())]


def _counts(proc: psutil.Process, pytest_pid: int) -> bool:
    """Whether ``proc`` is alive and not one of pytest's own stdlib helpers."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(proc.cmdline())
        return proc.ppid() != pytest_pid or not any(h in cmdline for h in _STDLIB_HELPERS)
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120]!r}"
    except psutil.Error:
        return str(proc.pid)


def _kill(procs: list[psutil.Process]) -> list[str]:
    """SIGKILL ``procs`` and whatever of the session they start meanwhile; describe them."""
    killed: dict[int, str] = {}
    for _ in range(40):  # a pool may replace a worker killed a moment ago
        if not procs:
            break
        for proc in procs:
            killed.setdefault(proc.pid, _describe(proc))
            with contextlib.suppress(psutil.Error):
                proc.kill()
        time.sleep(0.05)  # SIGKILL takes effect asynchronously
        procs = _session_processes()
    return list(killed.values())


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process of the session running or a segment behind.

    Runs after the test whatever happened (failure, pytest-timeout's
    exception, Ctrl-C): what is left is killed and removed, so the next test
    starts clean.
    """
    directory = _session["dir"]
    before = set(os.listdir(directory))
    yield
    interrupted = request.session.exitstatus == pytest.ExitCode.INTERRUPTED
    killed = _kill(_stray_after(0.0 if interrupted else 5.0))
    new = _remove_entries_since(directory, before)
    if interrupted:
        return  # torn down by Ctrl-C: failing now would only bury the interrupt
    assert not killed, f"test left processes running (killed now): {killed}"
    assert not new, f"test left entries in the segment directory {directory}: {new}"


def _stray_after(grace: float) -> list[psutil.Process]:
    """The session's processes still running after ``grace`` seconds (for them to exit)."""
    deadline = time.monotonic() + grace  # workers and janitors wind down by themselves
    stray = _session_processes()
    while stray and time.monotonic() < deadline:
        time.sleep(0.05)
        stray = _session_processes()
    return stray


def _remove_entries_since(directory: str, before: set[str]) -> list[str]:
    """Remove the entries of ``directory`` that are not in ``before``; return their names."""
    new = sorted(set(os.listdir(directory)) - before)
    for name in new:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return new


# -- forks from a multi-threaded process -----------------------------------------
#
# Python 3.12+ warns in the parent of a fork() made while other threads run
# (a DeprecationWarning; os.fork() swallows it when a filter makes it an
# error). Caught here with the threads alive at that moment, it fails the
# test that forked, unless the test is marked forks_with_threads.

@dataclasses.dataclass(frozen=True)
class _Fork:
    filename: str  # of the code that called fork()
    lineno: int
    threads: tuple[str, ...]  # the other threads when fork() warned

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} beside {', '.join(self.threads)}"


def _other_threads() -> tuple[str, ...]:
    """Names of this process's threads but the calling one, native threads included."""
    python = {t.native_id: t.name for t in threading.enumerate()}
    names = []
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid == threading.get_native_id():
            continue
        if tid in python:
            names.append(python[tid])
            continue
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as comm:
            names.append(f"native {comm.read().strip()}")
    return tuple(sorted(names))


_fork_key = pytest.StashKey[list[_Fork]]()


@contextlib.contextmanager
def _fork_warnings(item: pytest.Item) -> Iterator[None]:
    """Record the multi-threaded fork warnings of ``item``; pass the others on to pytest."""
    found = item.stash.setdefault(_fork_key, [])
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "always", message=".*" + _FORK_WARNING.pattern, category=DeprecationWarning
        )
        passed_on = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
            # Called in the forking thread just after fork() returned: the
            # threads listed are the ones Python counted, unless they were
            # already exiting (joined; a closed stdlib Pool's, say), which
            # Python counts too, and which hold no lock. Those only show.
            fork = issubclass(category, DeprecationWarning) and _FORK_WARNING.search(str(message))
            threads = _other_threads() if fork else ()
            if threads:
                found.append(_Fork(filename, lineno, threads))
            else:
                passed_on(message, category, filename, lineno, *rest)

        warnings.showwarning = show
        yield


def _check_forks(item: pytest.Item) -> None:
    forks = item.stash.get(_fork_key, [])
    item.stash[_fork_key] = []
    if not forks or item.get_closest_marker("forks_with_threads") is not None:
        return
    raise MultiThreadedForkError(
        "forked while other threads ran (Python 3.12+'s multi-threaded fork() warning): "
        + "; ".join(map(str, forks))
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    with _fork_warnings(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Judge the forks of setup and call in the call phase: they fail the test itself."""
    try:
        with _fork_warnings(item):
            result = yield
    except BaseException:
        item.stash[_fork_key] = []  # the test failed already; that failure is the news
        raise
    _check_forks(item)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    with _fork_warnings(item):
        result = yield
    _check_forks(item)
    return result


def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def mounted_tmpfs(size: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private tmpfs of ``size`` (mount's ``size=``) as the segment directory.

    Skips the test where no tmpfs can be mounted. At the end, exports whose
    objects died with the test are collected, and the unmount is retried
    while their mappings go.
    """
    path = tempfile.mkdtemp(prefix=f"forkref-test-tmpfs-{size}-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a {size} tmpfs here: {mounted.stderr!r}")
    monkeypatch.setenv(_shm.ENV_DIR, path)
    try:
        yield path
    finally:
        gc.collect()
        wait_until(lambda: subprocess.run(["umount", path], check=False).returncode == 0)
        os.rmdir(path)


@pytest.fixture
def small_tmpfs(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A 1 MiB tmpfs as the segment directory."""
    with mounted_tmpfs("1m", monkeypatch) as path:
        yield path


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    """One private local Ray of 2 CPUs for a test module: its pools join it and leave it running.

    For the Ray test modules, which import ``ray_harness`` (before Ray) and its
    ``no_leftovers``, which spares this instance's processes.
    """
    import ray_harness

    with ray_harness.local_ray(num_cpus=2) as context:
        yield context


@pytest.fixture
def private_tmpdir(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Temporary files of the code under test (and its children) go to a directory of its own.

    The bench keeps its peers' stderr in a temporary file; in /tmp it would outlive
    the test. The directory is short and under /tmp, not pytest's tmp_path: Ray
    puts its sockets under the temporary directory, and AF_UNIX paths are short.
    """
    tmp_path_factory.getbasetemp()  # pytest's own base stays where it is
    directory = tempfile.mkdtemp(prefix="forkref-t-", dir="/tmp")
    monkeypatch.setenv("TMPDIR", directory)
    monkeypatch.setattr(tempfile, "tempdir", directory)
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
