"""Shared fixtures: every test leaves no child process behind and no segment in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest

# Long-lived helpers the stdlib starts once per interpreter; they are not orphans.
_STDLIB_HELPERS = ("forkserver", "resource_tracker", "semaphore_tracker")


def _stray_children() -> list[psutil.Process]:
    stray = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if not any(name in cmdline for name in _STDLIB_HELPERS):
            stray.append(child)
    return stray


# This session's own segment directory: other runs on the machine never show in it.
_SESSION_SHM = tempfile.mkdtemp(prefix="forkref-test-session-", dir="/dev/shm")
os.environ["FORKREF_SHM_DIR"] = _SESSION_SHM


def _shm_names() -> set[str]:
    try:
        return set(os.listdir(os.environ.get("FORKREF_SHM_DIR") or _SESSION_SHM))
    except FileNotFoundError:
        return set()


def pytest_sessionfinish(session: pytest.Session) -> None:
    import shutil

    shutil.rmtree(_SESSION_SHM, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a child process running or a new /dev/shm segment."""
    shm_before = _shm_names()
    yield
    deadline = time.monotonic() + 5.0
    stray = _stray_children()
    while stray and time.monotonic() < deadline:
        time.sleep(0.05)
        stray = _stray_children()
    for proc in stray:
        proc.kill()
    assert not stray, f"test left child processes running: {stray}"
    new_shm = {n for n in _shm_names() - shm_before if "forkref" in n or n.startswith("psm_")}
    assert not new_shm, f"test left shared-memory segments behind: {sorted(new_shm)}"


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
    from forkref import _shm

    monkeypatch.setenv(_shm.ENV_DIR, path)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)
