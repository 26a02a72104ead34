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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator

import psutil
import pytest

from forkref import _shm

SESSION_ENV = "FORKREF_TEST_SESSION"
# Long-lived helpers the stdlib starts once per interpreter (this one's only).
_STDLIB_HELPERS = ("forkserver", "resource_tracker", "semaphore_tracker")

_session: dict[str, str] = {}  # "token", "dir", and the environment it replaced


def pytest_configure(config: pytest.Config) -> None:
    parent = os.environ.get(_shm.ENV_DIR) or "/dev/shm"
    directory = tempfile.mkdtemp(prefix=f"forkref-tests-{os.getpid()}-", dir=parent)
    _session.update(
        token=secrets.token_hex(8),
        dir=directory,
        old_dir=os.environ.get(_shm.ENV_DIR, ""),
        old_token=os.environ.get(SESSION_ENV, ""),
    )
    os.environ[_shm.ENV_DIR] = directory
    os.environ[SESSION_ENV] = _session["token"]


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _session:
        return
    left = _kill(_session_processes())
    if left:
        warnings.warn(f"forkref tests: killed processes left at the end: {left}", stacklevel=1)
    shutil.rmtree(_session["dir"], ignore_errors=True)
    for name, old in ((_shm.ENV_DIR, _session["old_dir"]), (SESSION_ENV, _session["old_token"])):
        if old:
            os.environ[name] = old
        else:
            os.environ.pop(name, None)
    _session.clear()


# -- processes of this session ---------------------------------------------------


def _marked_pids(token: str) -> set[int]:
    """Pids whose environment carries this session's token (started by exec, at any depth)."""
    marker = f"{SESSION_ENV}={token}\0".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as env:
                if marker in env.read():
                    found.add(int(entry.name))
        except OSError:  # gone, or a kernel thread
            continue
    return found


def _session_processes() -> list[psutil.Process]:
    """Live processes of this session except pytest and its own stdlib helpers.

    Descendants (forked children keep pytest's original environment, without
    the token) and marked processes (which may have left the tree: orphans,
    processes in new sessions).
    """
    me = psutil.Process()
    procs = {p.pid: p for p in me.children(recursive=True)}
    for pid in _marked_pids(_session["token"]) - procs.keys() - {me.pid}:
        with contextlib.suppress(psutil.Error):
            procs[pid] = psutil.Process(pid)
    return [p for p in procs.values() if _counts(p, me.pid)]


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
    killed: list[str] = []
    for _ in range(20):  # a pool may replace a worker killed a moment ago
        if not procs:
            break
        killed += [_describe(p) for p in procs]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        time.sleep(0.05)
        procs = _session_processes()
    return killed


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a process of the session running or a segment behind.

    Runs after the test whatever happened (failure, pytest-timeout's
    exception): what is left is killed and removed, so the next test starts
    clean.
    """
    directory = _session["dir"]
    before = set(os.listdir(directory))
    yield
    deadline = time.monotonic() + 5.0  # workers and janitors wind down by themselves
    stray = _session_processes()
    while stray and time.monotonic() < deadline:
        time.sleep(0.05)
        stray = _session_processes()
    killed = _kill(stray)
    new = sorted(set(os.listdir(directory)) - before)
    for name in new:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    assert not killed, f"test left processes running (killed now): {killed}"
    assert not new, f"test left entries in the segment directory {directory}: {new}"


@pytest.fixture
def small_tmpfs(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A 1 MiB tmpfs as the segment directory (a plain directory if we cannot mount)."""
    path = tempfile.mkdtemp(prefix="forkref-test-tmpfs-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr!r}")

    monkeypatch.setenv(_shm.ENV_DIR, path)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)
