"""The test session's own guarantees (conftest.py): isolation and clean-up.

* Every process the suite starts sees the session's segment directory.
* A test that times out (pytest-timeout) or fails still has its processes
  killed: children, grandchildren in sessions of their own, orphans; so does
  a session stopped by Ctrl-C. Proven on inner pytest runs whose tests leave
  such processes behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forkref._shm import segments
from helpers import alive

pytest_plugins = ["pytester"]

_CONFTEST = Path(__file__).with_name("conftest.py")
_PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def _segment_dir() -> str:
    return segments.segment_dir()


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_see_the_sessions_own_segment_directory(method: str) -> None:
    directory = os.environ[segments.ENV_DIR]
    assert os.path.basename(directory).startswith("forkref-tests-")
    assert os.path.isdir(directory)
    with mp.get_context(method).Pool(1) as pool:
        assert pool.apply(_segment_dir) == directory
    script = "from forkref._shm import segments; print(segments.segment_dir())"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == directory


# The inner session: each test leaves processes behind and ends badly; the
# last one checks, from inside the session, that they were all killed.
_INNER = '''
import json, os, subprocess, sys, time

PIDS = {pids!r}
# A child that starts a grandchild in a new session, and an orphan in another
# new session (the orphan's parent exits at once); it prints both pids.
ORPHAN_PARENT = (
    "import subprocess, sys; "
    "print(subprocess.Popen(sys.argv[1:], start_new_session=True).pid, flush=True)"
)
PARENT = """
import subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
kept = subprocess.Popen(sleeper, start_new_session=True)
orphan_parent = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], *sleeper], stdout=subprocess.PIPE, text=True
)
orphan = int(orphan_parent.stdout.readline())
orphan_parent.wait()
print(kept.pid, orphan, flush=True)
time.sleep(600)
"""


def start_family(name):
    child = subprocess.Popen(
        [sys.executable, "-c", PARENT, ORPHAN_PARENT], stdout=subprocess.PIPE, text=True
    )
    grandchild, orphan = map(int, child.stdout.readline().split())
    forked = os.fork()
    if forked == 0:
        time.sleep(600)
        os._exit(0)
    with open(PIDS, "a") as out:
        out.write(json.dumps([name, [child.pid, grandchild, orphan, forked]]) + "\\n")


def test_times_out():
    start_family("timeout")
    time.sleep(600)


def test_fails():
    start_family("failure")
    assert False, "this test fails"


def test_their_processes_were_killed():
    import psutil
    for line in open(PIDS):
        name, pids = json.loads(line)
        for pid in pids:
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            assert not alive, (name, pid)
'''


@pytest.mark.timeout(180)
def test_timed_out_and_failed_tests_have_their_processes_killed(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pids = tmp_path / "pids.jsonl"
    pytester.makeconftest(_CONFTEST.read_text())
    pytester.makepyfile(test_inner=_INNER.format(pids=str(pids)))
    result = pytester.runpytest_subprocess(
        "-c", str(_PYPROJECT), "--rootdir", str(pytester.path), "-p", "no:cacheprovider",
        "--timeout=3", "test_inner.py",
    )  # fmt: skip
    recorded = [json.loads(line) for line in pids.read_text().splitlines()]
    assert [name for name, _ in recorded] == ["timeout", "failure"]
    assert all(not alive(pid) for _, family in recorded for pid in family), recorded
    result.assert_outcomes(failed=2, passed=1, errors=2)
    result.stdout.fnmatch_lines(
        ["*test left processes running (killed now)*", "*Timeout (>3.0s) from pytest-timeout*"]
    )


_SLEEPS_IN_A_CHILD = """
import subprocess, sys, time

def test_interrupted():
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleeper, start_new_session=True)
    with open({pid_file!r}, "w") as out:
        out.write(str(child.pid))
    time.sleep(600)
"""

# pytest in a child that handles SIGINT itself: started from a shell that
# ignores SIGINT (a background job), Python would keep ignoring it.
_PYTEST_WITH_SIGINT = (
    "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


@pytest.mark.timeout(180)
def test_an_interrupted_session_kills_its_processes(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    pytester.makeconftest(_CONFTEST.read_text())
    pytester.makepyfile(test_inner=_SLEEPS_IN_A_CHILD.format(pid_file=str(pid_file)))
    args = ["-c", str(_PYPROJECT), "--rootdir", str(pytester.path), "-p", "no:cacheprovider"]
    session = subprocess.Popen(
        [sys.executable, "-c", _PYTEST_WITH_SIGINT, *args, "test_inner.py"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert session.poll() is None, "the inner session ended before its test started"
            assert time.monotonic() < deadline, "the inner test did not start"
            time.sleep(0.05)
    finally:
        session.send_signal(signal.SIGINT)  # Ctrl-C; also if this test is interrupted itself
        out, _ = session.communicate(timeout=120)
    assert session.returncode == pytest.ExitCode.INTERRUPTED, out
    assert not alive(int(pid_file.read_text())), out
