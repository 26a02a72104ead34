"""A pool's processes live and die with the program that made them (issue 8).

Each test runs a real script in its own interpreter: a spawn pool at a
script's top level without the ``__main__`` guard, and a parent killed with
SIGKILL while its workers run a task that never ends, under every start
method.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from helpers import alive

pytestmark = pytest.mark.timeout(120)

METHODS = ["fork", "forkserver", "spawn"]


def _run(script: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a session of its own; on a timeout, kill the whole session."""
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its workers too: a hang must not leave them
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("api", ["Pool", "ProcessPoolExecutor"])
def test_missing_main_guard_is_a_clear_error_not_a_hang(
    method: str, api: str, tmp_path: Path
) -> None:
    script = tmp_path / "unguarded.py"
    call = (
        "forkref.Pool(2, context=ctx).map(abs, [-1, -2])"
        if api == "Pool"
        else "list(forkref.ProcessPoolExecutor(2, mp_context=ctx).map(abs, [-1, -2]))"
    )
    script.write_text(
        textwrap.dedent(f"""\
            import multiprocessing, forkref
            ctx = multiprocessing.get_context({method!r})
            print("RESULT", {call})
            """)
    )
    start = time.monotonic()
    done = _run(script, timeout=90)
    assert time.monotonic() - start < 60
    assert done.returncode != 0, done.stdout
    assert "RESULT" not in done.stdout
    assert 'if __name__ == "__main__":' in done.stderr
    assert "BrokenPoolError" in done.stderr  # the parent's own error, not only the child's


_SCRIPT = """\
import multiprocessing, os, sys, time
import forkref

def forever(_):
    time.sleep(3600)

if __name__ == "__main__":
    ctx = multiprocessing.get_context({method!r})
    pool = forkref.Pool(2, context=ctx)
    pool.map_async(forever, range(2), chunksize=1)
    deadline = time.monotonic() + 60
    while len(pool.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # both workers are inside their never-ending task
    helpers = pool._engine.zygote_pids()
    if {method!r} == "forkserver":
        from multiprocessing import forkserver
        helpers.append(forkserver._forkserver._forkserver_pid)
    print(" ".join(map(str, pool.pids())), "|", " ".join(map(str, helpers)), flush=True)
    time.sleep(3600)
"""


@pytest.mark.parametrize("method", METHODS)
def test_workers_die_with_a_parent_killed_by_sigkill(method: str, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_SCRIPT.format(method=method))
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        workers_text, _, helpers_text = line.partition("|")
        workers = [int(p) for p in workers_text.split()]
        helpers = [int(p) for p in helpers_text.split()]
        assert len(workers) == 2, line
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
        left = _still_running(workers + helpers, seconds=10)
        assert not left, f"processes of the killed parent still run: {left}"
        session = _session_left(parent.pid, seconds=10)
        assert not session, f"processes of the killed parent's session still run: {session}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _still_running(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    for pid in left:  # clean up what the assertion will report
        os.kill(pid, signal.SIGKILL)
    return left


def _session_left(sid: int, seconds: float) -> list[str]:
    """Live (not zombie) processes of session ``sid``, after waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "status", "cmdline"]):
            try:
                if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
            except (ProcessLookupError, PermissionError):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


