"""A real IPython kernel for tests and measurements, started by the caller and always cleaned up.

The kernel runs this interpreter (``sys.executable``: the venv's python, where
forkref and ipykernel are installed) from a kernelspec written to a temporary
directory, with ``IPYTHONDIR`` and the Jupyter runtime directory there too:
nothing is read from or written to the user's home, and no kernelspec needs
installing. Cells run through ``nbclient`` as in Jupyter.

jupyter_client starts the kernel in a session of its own, so everything it
starts (forkref's fork servers and workers, spawn workers, multiprocessing's
helpers) is in the kernel's process group. :func:`running_kernel` kills that
whole group when it exits, whatever happened: a failed assertion, a cell that
timed out, pytest-timeout's exception, Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

KERNEL_NAME = "forkref-test"


def _write_kernelspec(root: Path) -> Path:
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "forkref tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root / "kernels"


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the kernel's group; wait (briefly) until none is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Kernel:
    """A started kernel and the event loop that drives it (in the caller's thread)."""

    def __init__(self, km: AsyncKernelManager, loop: asyncio.AbstractEventLoop) -> None:
        self.km = km
        self.loop = loop


@contextlib.contextmanager
def running_kernel(tmp: Path, env: dict[str, str] | None = None) -> Iterator[Kernel]:
    """Start a kernel (of this interpreter) under ``tmp``; shut it down and kill its group after.

    The asynchronous kernel manager runs on an event loop of our own, driven
    from the caller's thread: the synchronous API would leave jupyter_core's
    runner thread behind, and forkref would rightly warn about it in the tests
    that follow.
    """
    kernel_env = dict(os.environ if env is None else env)
    kernel_env.update(
        IPYTHONDIR=str(tmp / "ipython"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    kernel_env.pop("PYTEST_CURRENT_TEST", None)  # ipykernel then captures fds as in Jupyter
    specs = KernelSpecManager(kernel_dirs=[str(_write_kernelspec(tmp))])
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    km.connection_file = str(tmp / "connection.json")
    km.transport = "ipc"  # unix sockets under tmp: no TCP port, nothing on the network
    km.ip = str(tmp / "kernel-ipc")
    loop = asyncio.new_event_loop()
    pgid = None
    # A SIGTERM (a CI time limit, kill) must run the cleanup below too.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        loop.run_until_complete(km.start_kernel(env=kernel_env))
        pgid = os.getpgid(km.provisioner.pid)  # type: ignore[union-attr]
        yield Kernel(km, loop)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.wait_for(km.shutdown_kernel(now=True), 30))
        if pgid is not None and pgid != os.getpgid(0):
            _kill_group(pgid)
        with contextlib.suppress(Exception):
            loop.run_until_complete(km.cleanup_resources())  # connection file, ipc sockets
        loop.close()
        if main:
            signal.signal(signal.SIGTERM, previous)


def notebook(cells: Sequence[str | Any]) -> Any:
    """A notebook of code cells (strings, or cells already made)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) if isinstance(c, str) else c for c in cells]
    return nb


def execute(kernel: Kernel, nb: Any, timeout: float = 120) -> Any:
    """Run every cell of ``nb`` in ``kernel`` (``timeout`` seconds per cell).

    Raises nbclient's ``CellExecutionError`` on an error in a cell not tagged
    ``raises-exception``, ``CellTimeoutError`` on a cell that runs too long.
    """
    client = NotebookClient(nb, km=kernel.km, timeout=timeout, kernel_name=KERNEL_NAME)
    # cleanup_kc: stop the client's channels (and their heartbeat thread) at the end.
    kernel.loop.run_until_complete(client.async_execute(cleanup_kc=True))
    return nb


def stream_text(cell: Any, name: str = "stdout") -> str:
    """The text a cell printed on ``name`` (stdout or stderr)."""
    return "".join(
        o.get("text", "")
        for o in cell.outputs
        if o.get("output_type") == "stream" and o.get("name") == name
    )
