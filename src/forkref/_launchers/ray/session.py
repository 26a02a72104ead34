"""The Ray instance a ``backend="ray"`` pool runs on: found, joined or started, and left.

Ray itself is imported here, lazily (:func:`import_ray`), never at import.

Non-goals: no Ray Client (``ray://``) specifics; no management of a cluster
forkref did not start (it is joined and left running).
"""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Mapping
from typing import Any

from forkref._errors import Error

__all__ = ["INSTALL", "RaySession", "import_ray"]

INSTALL = "pip install 'forkref[ray]'"


def import_ray() -> types.ModuleType:
    """Import Ray (lazily: only a ``backend="ray"`` pool needs it).

    Raises:
        Error: Ray is not installed; the message gives the install command.
    """
    try:
        import ray
    except ImportError as err:
        raise Error(
            f"backend='ray' needs Ray, which cannot be imported here ({err}); install it with "
            f"{INSTALL} (Ray 2.60 or later), or use the local backend (the default)"
        ) from err
    module: types.ModuleType = ray
    return module


# -- the Ray instance a pool runs on ----------------------------------------------------

_session_lock = threading.Lock()
_started_by_us = 0  # pools using a Ray instance that forkref started or connected to


class RaySession:
    """Ray as one pool uses it: connected (or started) at the pool's start.

    * Ray already initialised in this process: use it; leave it as it is.
    * ``address`` given (or ``RAY_ADDRESS`` set, Ray's own variable): connect;
      at close, disconnect this process, and leave the cluster running.
    * Otherwise start a private local Ray instance with ``num_cpus=processes``
      (``address="local"``: never attach to another user's instance on this
      machine by accident) and shut it down when the last pool using it closes.

    ``init_options`` go to ``ray.init`` as they are (``object_store_memory``,
    ``runtime_env``, ...).
    """

    def __init__(
        self, processes: int, address: str | None, init_options: Mapping[str, Any] | None = None
    ) -> None:
        global _started_by_us
        self.ray = ray = import_ray()
        self._closed = False
        with _session_lock:
            if ray.is_initialized():
                self.ours = _started_by_us > 0
            else:
                options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
                options.update(init_options or {})
                if address is None and not os.environ.get("RAY_ADDRESS"):
                    options.setdefault("num_cpus", processes)
                    address = "local"
                try:
                    ray.init(address=address, **options)
                except Exception as err:
                    where = "start a local Ray instance" if address == "local" else (
                        f"connect to the Ray cluster at {address or os.environ['RAY_ADDRESS']!r}"
                    )
                    raise Error(
                        f"cannot {where} for a backend='ray' pool: {err!r}; check the address "
                        "(`ray status` on the head node prints it) and that this Ray and "
                        "Python match the cluster's"
                    ) from err
                self.ours = True
            if self.ours:
                _started_by_us += 1

    def close(self) -> None:
        """Shut Ray down if this was the last pool on an instance forkref started. Idempotent."""
        global _started_by_us
        if self._closed:
            return
        self._closed = True
        if not self.ours:
            return
        with _session_lock:
            _started_by_us -= 1
            if _started_by_us == 0 and self.ray.is_initialized():
                self.ray.shutdown()
