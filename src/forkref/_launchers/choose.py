"""Which launcher a pool gets: the one place that decides.

::

    backend="local"  context's start method "fork"      -> ZygoteLauncher  (zygote)
                     "spawn" or "forkserver"            -> ProcessLauncher (process)
    backend="ray"    (address= optional)                -> RayLauncher     (ray, imported
                                                           only when asked for)

The pools call :func:`launcher_for` and hand the result to their
:class:`~forkref._engine.engine.Engine`, which knows only the
:class:`~forkref._engine.launcher.Launcher` interface.

Non-goals: no fallback from one backend to another; an unknown backend or an
argument that does not fit it is an error.
"""

from __future__ import annotations

import dataclasses
from multiprocessing.context import BaseContext

from forkref._engine.launcher import Launcher
from forkref._engine.worker import WorkerSetup
from forkref._launchers.process import ProcessLauncher
from forkref._launchers.zygote import ZygoteLauncher

__all__ = ["launcher_for"]


def launcher_for(
    backend: str,
    processes: int,
    context: BaseContext,
    setup: WorkerSetup,
    address: str | None = None,
) -> Launcher:
    """The launcher of a pool of ``processes`` workers that start with ``setup``.

    Args:
        backend: ``"local"`` (this machine, ``context``'s start method) or ``"ray"``.
        processes: workers per generation.
        context: the ``multiprocessing`` context of local workers.
        setup: what every worker starts with (its ``start_method`` is set
            here to the one the workers really use).
        address: the Ray cluster to join (``backend="ray"`` only).

    Raises:
        ValueError: an unknown backend, or ``address`` without ``backend="ray"``.
    """
    if backend == "local":
        if address is not None:
            raise ValueError("address= is for backend='ray'; the local backend runs here")
        method = context.get_start_method()
        setup = dataclasses.replace(setup, start_method=method)
        if method == "fork":
            return ZygoteLauncher(setup)
        return ProcessLauncher(context, setup)
    if backend != "ray":
        raise ValueError(f"backend must be 'local' or 'ray', not {backend!r}")
    from forkref._launchers.ray.launcher import RayLauncher

    return RayLauncher(processes, dataclasses.replace(setup, start_method="ray"), address=address)
