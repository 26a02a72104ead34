"""forkref in a real IPython kernel, driven by nbclient as Jupyter drives it.

Each test starts its own kernel (this interpreter, see :mod:`kernel_harness`)
and kills it with every process it started at the end, pass or fail.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from fork_while_printing import measure
from kernel_harness import Kernel, execute, notebook, running_kernel, stream_text


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    before = set(threading.enumerate())
    with running_kernel(tmp_path) as started:
        yield started
    # Threads left behind would make forkref warn in every later test.
    assert set(threading.enumerate()) <= before


def _json_lines(cell: Any) -> list[Any]:
    lines = stream_text(cell).splitlines()
    return [json.loads(line) for line in lines if line.startswith(("{", "["))]


# -- the kernel's threads and ForkWarning -------------------------------------------

THREADS = """
import json, threading, warnings
import forkref
from forkref._fork import threads as _threads

def judged():
    me = threading.current_thread()
    others = [t for t in threading.enumerate() if t is not me]
    return {
        "kernel": sorted(t.name for t in _threads.kernel_threads()),
        "warn": sorted(t.name for t in _threads.threads_to_warn_about(others)),
    }

def fork_a_pool():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with forkref.Pool(2) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]
    return [f"{w.category.__name__}: {w.message}" for w in caught]

print(json.dumps(judged()))
print(json.dumps(fork_a_pool()))
"""

USER_THREAD = """
stop = threading.Event()
user = threading.Thread(target=stop.wait, name="user-thread")
user.start()
print(json.dumps(judged()))
print(json.dumps([fork_a_pool(), fork_a_pool()]))  # one call site: one warning
stop.set()
user.join()
"""


def test_kernel_threads_are_recognised_and_do_not_warn(kernel: Kernel) -> None:
    nb = execute(kernel, notebook([THREADS, USER_THREAD]))
    alone, no_warnings = _json_lines(nb.cells[0])
    for name in ("Heartbeat", "Control", "Shell channel", "IOPub", "IPythonHistorySavingThread"):
        assert name in alone["kernel"]
    assert sum("_watch_pipe_fd" in name for name in alone["kernel"]) == 2  # stdout, stderr
    assert alone["warn"] == []  # every thread but the main one is the kernel's
    assert no_warnings == []  # nor Python 3.12's multi-threaded fork DeprecationWarning

    with_user, (first, second) = _json_lines(nb.cells[1])
    assert with_user["warn"] == ["user-thread"]
    assert with_user["kernel"] == alone["kernel"]
    assert len(first) == 1
    assert first[0].startswith("ForkWarning: forkref is forking pool workers while 1 other")
    assert "user-thread" in first[0]
    assert "Heartbeat" not in first[0]
    assert second == []  # the same call site again


# -- fork while another cell's thread prints -----------------------------------------

HOLDER = """
import sys, threading, time, warnings
import forkref
warnings.simplefilter("ignore", forkref.ForkWarning)  # the holder thread is foreign
stop = threading.Event()

def hold():  # holds the stream lock most of the time, as a print() preempted inside it does
    while not stop.is_set():
        with sys.stdout._buffer_lock:
            time.sleep(0.05)
        time.sleep(0.0001)  # long enough for the IOPub thread to take it, not much longer

holder = threading.Thread(target=hold, name="holder")
holder.start()

def shout(i):
    print("shout %d" % i)
    return i

try:
    for _ in range(3):
        with forkref.Pool(2) as pool:
            assert pool.map_async(shout, range(4), chunksize=1).get(timeout=60) == [0, 1, 2, 3]
finally:
    stop.set()
    holder.join()
"""


def test_a_stream_lock_held_at_the_fork_does_not_hang_the_workers(kernel: Kernel) -> None:
    """Deterministic version of the hazard the measurement below finds by chance.

    A thread holds ``sys.stdout``'s lock almost all the time. Without
    forkref taking it around the fork, the workers would inherit it held and
    hang at their ``print()`` (the map would time out and the cell fail).
    """
    nb = execute(kernel, notebook([HOLDER]))
    # Workers' lines may run together: each print() is two writes, sent as they come.
    shouts = re.findall(r"shout \d", stream_text(nb.cells[0]))
    assert sorted(shouts) == sorted(f"shout {i}" for i in range(4) for _ in range(3))


def test_forking_pools_while_another_cells_thread_prints(kernel: Kernel) -> None:
    """The measurement of forkref/_threads.py, small: no child hangs, no lock inherited held."""
    m = measure(kernel, pools=60, raw_forks=200, timeout=60)
    assert m.pools == 60
    assert m.forks == 180
    assert m.hung == 0
    assert m.held == 0
    # Workers' prints reach the cell; not necessarily all under load: ipykernel drops
    # a child's output that its pipe cannot deliver within 3 s (linger).
    assert m.worker_lines > 0
    assert m.raw_held_locked == 0
    assert m.chatter_lines > 0


# -- a notebook, as a user runs it ------------------------------------------------------

TOUR = Path(__file__).parent / "notebooks" / "forkref_tour.ipynb"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.smoke
def test_the_tour_notebook_runs_clean(kernel: Kernel) -> None:
    """Fork and spawn, share(), lambdas, the executor, a worker's print, a task exception."""
    nb = execute(kernel, nbformat.read(TOUR, as_version=4))
    cells = {cell.id: cell for cell in nb.cells if cell.cell_type == "code"}
    # No warning of any kind: the kernel's threads are not foreign, and forkref's
    # forks do not trigger Python 3.12's multi-threaded fork DeprecationWarning.
    assert {name: stream_text(c, "stderr") for name, c in cells.items()} == dict.fromkeys(cells, "")
    assert stream_text(cells["fork"]) == "fork: [4999950000.0, 100000.0]\n"
    said = re.findall(r"worker says \d", stream_text(cells["executor"]))
    assert sorted(said) == ["worker says 0", "worker says 1", "worker says 2"]
    assert stream_text(cells["spawn"]) == "spawn: [4999950000.0, 100000.0]\n"

    (error,) = [o for o in cells["error"].outputs if o.output_type == "error"]
    assert (error.ename, error.evalue) == ("ValueError", "bad value 7")
    traceback = _ANSI.sub("", "\n".join(error.traceback))
    assert "RemoteTraceback" in traceback  # the worker's traceback, as the cause
    assert 'raise ValueError(f"bad value {x}")' in traceback
    assert "pool.apply(fails, (7,))" in traceback  # and the cell's line


# -- progress bars: tqdm.auto directly, and forkref's progress=True built on it -----------

TQDM_AUTO = """
from tqdm.auto import tqdm
total = 0
for i in tqdm(range(20), desc="tasks"):
    total += i
assert total == 190
"""
POOL_PROGRESS = """
import forkref

def square(x):
    return x * x

with forkref.Pool(2) as pool:
    assert pool.map(square, range(20), chunksize=3, progress=True) == [x * x for x in range(20)]
"""
NO_WIDGETS = """
import sys
sys.modules["ipywidgets"] = None  # as if it were not installed: importing it fails
"""
BARS = pytest.mark.parametrize("code", [TQDM_AUTO, POOL_PROGRESS], ids=["tqdm.auto", "Pool"])


@BARS
def test_progress_bar_renders_as_a_widget_in_a_kernel(kernel: Kernel, code: str) -> None:
    nb = execute(kernel, notebook([code]))
    cell = nb.cells[0]
    (shown,) = [o for o in cell.outputs if o.output_type == "display_data"]
    view = shown.data["application/vnd.jupyter.widget-view+json"]
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    assert state[view["model_id"]]["model_name"] == "HBoxModel"  # tqdm's bar: text, bar, text
    models = [m for m in state.values() if m["model_name"] == "FloatProgressModel"]
    assert [(m["state"]["value"], m["state"]["max"]) for m in models] == [(20.0, 20.0)]
    html = [m["state"]["value"] for m in state.values() if m["model_name"] == "HTMLModel"]
    texts = [t.replace("\u2007", " ") for t in html]  # tqdm pads with figure spaces
    assert any(t.startswith(" 20/20 [") for t in texts), texts
    assert stream_text(cell, "stderr") == ""  # no text bar besides it, no warning


@BARS
def test_progress_bar_degrades_to_text_without_ipywidgets(kernel: Kernel, code: str) -> None:
    nb = execute(kernel, notebook([NO_WIDGETS + code]))
    cell = nb.cells[0]
    assert not [o for o in cell.outputs if o.output_type == "display_data"]
    text = stream_text(cell, "stderr")
    assert "IProgress not found" in text  # tqdm says why it fell back
    final = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert "100%|" in final, final
    assert " 20/20 " in final, final
