"""Functions, lambdas and classes of ``__main__`` reach spawn and forkserver workers by value.

The scenarios run as real ``__main__`` programs in a subprocess: ``python -c``
(no file, like a notebook: the workers cannot import it) and a script file.
A notebook in a real kernel: tests/test_notebook.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from forkref._share.autoshare import AutoSharer
from forkref._share.taskpickle import TaskEncoder

METHODS = ["spawn", "forkserver"]

PROGRAM = textwrap.dedent(
    """
    import dataclasses, json, multiprocessing as mp, sys, warnings
    import numpy as np, pandas as pd
    import forkref

    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    class Scale:
        def __init__(self, k):
            self.k = k
        def __call__(self, x):
            return self.k * x

    class NotebookError(Exception):
        pass

    def colsum(df, col):
        return float(df[col].sum())

    def to_point(i):
        return Point(i, i * i)

    def fails(i):
        raise NotebookError(f"bad value {i}")

    if __name__ == "__main__":
        warnings.simplefilter("error")
        ctx = mp.get_context(sys.argv[1])
        frame = pd.DataFrame({"a": np.arange(1000.0), "b": np.ones(1000)})
        h = forkref.share(frame)
        out = {}
        with forkref.Pool(2, context=ctx) as pool:
            out["colsum"] = pool.starmap(colsum, [(h, c) for c in frame.columns])
            out["global"] = pool.map(lambda c: float(h[c].sum()), frame.columns)
            out["lambda"] = pool.map(lambda x: x + 1, [1, 2])
            out["instance"] = pool.map(Scale(3), [1, 2])
            out["points"] = [[type(p) is Point, p.x, p.y] for p in pool.map(to_point, [2, 3])]
            try:
                pool.apply(fails, (7,))
            except NotebookError as err:
                out["error"] = [type(err) is NotebookError, str(err)]
        with forkref.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            out["executor"] = list(ex.map(lambda x: 2 * x, [1, 2]))
        print(json.dumps(out))
    """
)

EXPECTED = {
    "colsum": [499500.0, 1000.0],
    "global": [499500.0, 1000.0],
    "lambda": [2, 3],
    "instance": [3, 6],
    "points": [[True, 2, 4], [True, 3, 9]],
    "error": [True, "bad value 7"],
    "executor": [2, 4],
}


def _run(args: list[str], cwd: Path | None = None) -> Any:
    """Run ``python args`` in its own session; kill the whole session if it times out."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # spawn workers and helpers too
        proc.wait()
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", METHODS)
def test_main_without_a_file(method: str) -> None:
    """Like a notebook: the workers cannot import __main__, everything goes by value."""
    assert _run(["-c", PROGRAM, method]) == EXPECTED


@pytest.mark.parametrize("method", METHODS)
def test_script_file(method: str, tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(PROGRAM)
    assert _run(["script.py", method], cwd=tmp_path) == EXPECTED


def test_script_functions_go_by_name_as_with_the_stdlib(tmp_path: Path) -> None:
    """The spawn worker re-imports a script: its functions go by name (by value, a lock fails)."""
    script = textwrap.dedent(
        """
        import json, multiprocessing as mp, threading
        import forkref

        LOCK = threading.Lock()

        def locked_double(x):
            with LOCK:
                return 2 * x

        if __name__ == "__main__":
            with forkref.Pool(1, context=mp.get_context("spawn")) as pool:
                print(json.dumps(pool.map(locked_double, [1, 2])))
        """
    )
    (tmp_path / "script.py").write_text(script)
    assert _run(["script.py"], cwd=tmp_path) == [2, 4]


def test_main_function_over_an_unpicklable_global_fails_clearly() -> None:
    program = textwrap.dedent(
        """
        import multiprocessing as mp, threading
        import forkref

        LOCK = threading.Lock()

        def locked_double(x):
            with LOCK:
                return 2 * x

        with forkref.Pool(1, context=mp.get_context("spawn")) as pool:
            try:
                pool.map(locked_double, [1])
            except forkref.TaskPicklingError as err:
                print(__import__("json").dumps(str(err)))
        """
    )
    message = _run(["-c", program])
    assert "cannot send the function" in message
    assert "_thread.lock" in message
    assert "defined in __main__" in message
    assert "pass the unpicklable ones as arguments" in message


def sqr(x: int) -> int:
    return x * x


def test_importable_functions_keep_going_by_name() -> None:
    encoder = TaskEncoder(AutoSharer(None, False, by_reference=False), False, "spawn")
    blob = encoder.encode_function(sqr).blob
    assert b"cloudpickle" not in blob
    assert b"sqr" in blob
    assert pickle.loads(blob) is sqr


def test_main_functions_go_by_value_only_without_fork() -> None:
    lam = eval("lambda x: x + 1", {"__name__": "__main__"})  # a lambda of __main__
    spawn = TaskEncoder(AutoSharer(None, False, by_reference=False), False, "spawn")
    blob = spawn.encode_function(lam).blob
    assert b"cloudpickle" in blob
    assert pickle.loads(blob)(1) == 2
    fork = TaskEncoder(AutoSharer(None, False, by_reference=True), True, "fork")
    assert b"cloudpickle" not in fork.encode_function(lam).blob
