"""No leaks: after exit, exception, KeyboardInterrupt, worker SIGKILL and parent SIGKILL.

Each scenario runs a real parent program in a subprocess, with its segment
directory on a private tmpfs. The parent shares a DataFrame with spawn
workers (exported through shared memory) and gets results back as named
segments, some never imported; then it ends the scenario's way. Afterwards
the tmpfs must be empty *and* use no bytes (so the unnamed export segments
were freed as well), no process of the scenario may be left, and nothing may
mention leaked shared memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(180)

_PARENT = textwrap.dedent(
    """
    import os, signal, sys
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    import numpy as np, pandas as pd
    import forkref

    def task(args):
        df, action = args
        token = forkref.export_result(np.asarray(df["f"]) * 2)  # 4 MiB result
        if action == "kill_self":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "kill_parent":
            os.kill(os.getppid(), signal.SIGKILL)
        if action == "interrupt_parent":
            os.kill(os.getppid(), signal.SIGINT)
        return token

    if __name__ == "__main__":
        # Started from a background job (or any parent that ignores SIGINT),
        # this process inherits SIGINT ignored, and Python then leaves it
        # ignored: the "interrupt" scenario needs the KeyboardInterrupt handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        scenario = sys.argv[1]
        df = pd.DataFrame({"f": np.arange(2**19, dtype=np.float64)})
        h = forkref.share(df)
        ctx = mp.get_context("spawn")
        if scenario == "kill_worker":
            with ProcessPoolExecutor(2, mp_context=ctx) as ex:
                try:
                    list(ex.map(task, [(h, "ok"), (h, "kill_self")]))
                except Exception as err:
                    print("parent saw", type(err).__name__, flush=True)
            sys.exit(0)
        if scenario == "interrupt":
            # Not multiprocessing.Pool: its terminate() after a KeyboardInterrupt
            # can deadlock in the stdlib (task handler stuck on the queue's lock).
            with ProcessPoolExecutor(2, mp_context=ctx) as ex:
                tokens = list(ex.map(task, [(h, "ok"), (h, "ok")]))
                kept = forkref.import_result(tokens[0])  # one imported, one left behind
                assert kept[1] == 2.0
                ex.submit(task, (h, "interrupt_parent")).result()
                signal.pause()  # the signal arrives; never reached past it
        with ctx.Pool(2) as pool:
            tokens = pool.map(task, [(h, "ok"), (h, "ok")], chunksize=1)
            kept = forkref.import_result(tokens[0])  # one imported, one left behind
            assert kept[1] == 2.0
            if scenario == "exception":
                raise RuntimeError("scenario: exception in the parent")
            if scenario == "kill_parent":
                pool.map(task, [(h, "kill_parent")])
                signal.pause()  # the signal arrives; never reached past it
        print("parent done", flush=True)
    """
)


@pytest.fixture
def tmpfs() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="forkref-lifecycle-")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", path], capture_output=True, check=False
    )
    if done.returncode:
        os.rmdir(path)
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def _used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _scenario_processes(path: str) -> list[psutil.Process]:
    """Processes that carry this scenario's segment directory in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FORKREF_SHM_DIR") == path:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _settled(path: str) -> bool:
    return not os.listdir(path) and _used_bytes(path) == 0 and not _scenario_processes(path)


@pytest.mark.parametrize(
    ("scenario", "returncode"),
    [
        ("exit", 0),
        ("exception", 1),
        ("interrupt", -2),  # uncaught KeyboardInterrupt: the process dies of SIGINT
        ("kill_worker", 0),
        ("kill_parent", -9),
    ],
)
def test_nothing_is_left_behind(tmpfs: str, tmp_path: Path, scenario: str, returncode: int) -> None:
    script = tmp_path / "parent.py"  # a file: spawn workers re-import __main__
    script.write_text(_PARENT)
    env = {
        **os.environ,
        "FORKREF_SHM_DIR": tmpfs,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    try:
        proc = subprocess.run(
            [sys.executable, str(script), scenario],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        # run() killed the parent only: its workers and janitor, some in
        # sessions of their own, are found by their environment.
        for p in _scenario_processes(tmpfs):
            p.kill()
        raise
    assert proc.returncode == returncode, proc.stderr
    if scenario == "exception":
        assert "scenario: exception in the parent" in proc.stderr
    if scenario == "interrupt":
        assert "KeyboardInterrupt" in proc.stderr
    if scenario == "kill_worker":
        assert "parent saw BrokenProcessPool" in proc.stdout
    # Workers, the janitor and the stdlib helpers wind down by themselves.
    deadline = time.monotonic() + 60
    while not _settled(tmpfs) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = _scenario_processes(tmpfs)
    for p in leftovers:
        p.kill()
    assert not leftovers, [p.cmdline() for p in leftovers]
    assert os.listdir(tmpfs) == []
    assert _used_bytes(tmpfs) == 0
    assert "shared_memory" not in proc.stderr
    # After a parent SIGKILL the stdlib's tracker reports the Pool's own
    # semaphores; any other leak report would be ours.
    leaks = [
        line
        for line in proc.stderr.lower().splitlines()
        if "leaked" in line and "leaked semaphore objects" not in line
    ]
    assert not leaks
    if scenario != "kill_parent":
        assert "leaked" not in proc.stderr.lower()
