"""A pool's shared objects in Ray's object store: each put once, dropped when released.

Non-goals: objects in the store are read-only snapshots, never synchronised
back; an object is not put before a task refers to it.
"""

from __future__ import annotations

import threading
import types
from typing import Any

from forkref._errors import NotInheritedError, TaskPicklingError
from forkref._refs.registry import Reference, registry

__all__ = ["ObjectTable"]


class ObjectTable:
    """Each shared object of one pool, put into Ray's object store once.

    Keyed by :class:`~forkref._refs.registry.Reference`: the object is looked up
    in this process's registry (it is registered here while a handle or an
    automatic share holds it) and put at its first use. An entry whose
    object is no longer registered is dropped at the next put; actors are
    told to forget it with their next call.
    """

    def __init__(self, ray: types.ModuleType) -> None:
        self._ray = ray
        self._lock = threading.Lock()
        self._refs: dict[Reference, Any] = {}  # Reference -> ObjectRef
        self.dropped: list[Reference] = []  # forgotten here; actors forget them at their next call

    def get(self, ref: Reference) -> Any:
        """The ObjectRef of ``ref``'s object, put now if it is the first use.

        Raises:
            NotInheritedError: ``ref`` is not registered in this process.
            TaskPicklingError: Ray cannot serialize the object.
        """
        with self._lock:
            found = self._refs.get(ref)
            if found is not None:
                return found
            obj = registry().lookup(ref)
            self._prune()
            try:
                found = self._refs[ref] = self._ray.put(obj)
            except Exception as err:
                raise TaskPicklingError(
                    f"cannot put the shared {ref.typename} into Ray's object store: {err!r}; "
                    "a backend='ray' pool sends shared objects through the store, so they must "
                    "be serializable by Ray (cloudpickle)"
                ) from err
            return found

    def _prune(self) -> None:
        reg = registry()
        for ref in list(self._refs):
            try:
                reg.serial(ref)
            except NotInheritedError:
                del self._refs[ref]
                self.dropped.append(ref)

    def clear(self) -> None:
        """Drop every ObjectRef (Ray frees the objects no task uses any more)."""
        with self._lock:
            self.dropped.extend(self._refs)
            self._refs.clear()

    def __len__(self) -> int:
        return len(self._refs)
