"""Python 3.12+'s multi-threaded fork() warning never counts a thread of forkref's.

conftest.py fails every test whose fork warns. Here each forkref thread meets
a fork on its own, in a fresh interpreter on Python 3.12 and 3.13 (which count
threads before and after the at-fork hooks), whatever the suite's order: the
export thread and a MemorySampler's, at forks made by forkref's pools and by
the stdlib's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).parents[1]

# Prints the multi-threaded fork warnings of main(), each with the threads
# alive when it was issued.
_PRELUDE = """
import multiprocessing as mp, os, threading, time, warnings
import forkref

def threads():
    python = {t.native_id: t.name for t in threading.enumerate()}
    return sorted(python.get(int(t), "native") for t in os.listdir("/proc/self/task"))

def settle():
    # Threads a closed pool joined may still be leaving the kernel (slowly on
    # a loaded machine), and Python counts them: not the case under test.
    deadline = time.monotonic() + 30
    while "native" in threads() and time.monotonic() < deadline:
        time.sleep(0.01)

def run(main):
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_: seen.append((str(message), threads()))
        main()
    print([s for s in seen if "multi-threaded" in s[0]])
"""

_SCENARIOS = {
    # A stdlib fork in a process whose export thread serves spawn workers; the
    # thread serves again once the fork has returned, with no new handle pickled
    # (a spawned process resolves one pickled before the fork).
    "forkref-export": """
import pickle, sys

def resolve(data):
    assert len(pickle.loads(data)) == 10

def main():
    handle = forkref.share(bytearray(10))
    with mp.get_context("spawn").Pool(1) as pool:  # not inherited: served by export
        assert pool.apply(len, (handle,)) == 10
    data = pickle.dumps(handle)
    settle()
    child = mp.get_context("fork").Process(target=len, args=((),))
    child.start()
    assert sys.getprofile() is None  # the one-shot watch for the fork's return is gone
    child.join()
    late = mp.get_context("spawn").Process(target=resolve, args=(data,))
    late.start()
    late.join(60)
    assert late.exitcode == 0, late.exitcode
""",
    # A stdlib fork pool started while a MemorySampler runs.
    "forkref-memory-sampler-stdlib": """
def main():
    with forkref.MemorySampler([os.getpid()], interval=0.01) as sampler:
        with mp.get_context("fork").Pool(2) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]
        assert sampler.running
""",
    # forkref's pool forks its first generation while a MemorySampler runs.
    "forkref-memory-sampler": """
def main():
    with forkref.Pool(1) as pool, forkref.MemorySampler([os.getpid()], interval=0.01):
        assert pool.apply(abs, (-1,)) == 1
""",
}
_RUN_MAIN = """
if __name__ == "__main__":
    run(main)
"""


def _cases() -> Iterator[Any]:
    """Every scenario on 3.12 and 3.13."""
    for thread in _SCENARIOS:
        for version in ("3.12", "3.13"):
            yield pytest.param(thread, version, id=f"{thread}-{version}")


def _python(version: str) -> str | None:
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    venv = _REPO / f".venv-{version}" / "bin" / "python"  # made by `make venvs`
    return str(venv) if venv.exists() else None


@pytest.mark.smoke  # 3.12 and 3.13 run it there even where the main suite runs first
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("thread", "version"), list(_cases()))
def test_no_multithreaded_fork_warning(tmp_path: Path, thread: str, version: str) -> None:
    python = _python(version)
    if python is None:
        pytest.skip(f"no Python {version} here (make venvs creates .venv-{version})")
    script = tmp_path / "scenario.py"  # a file: spawn workers re-import __main__
    script.write_text(_PRELUDE + textwrap.dedent(_SCENARIOS[thread]) + _RUN_MAIN)
    env = {**os.environ, "PYTHONPATH": str(_REPO / "src")}
    done = subprocess.run(
        [python, str(script)], capture_output=True, text=True, env=env, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
