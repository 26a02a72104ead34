"""Memory reports of a ``backend="ray"`` pool: its actors, and each node's object store.

Non-goals: no memory figures of Ray's own processes (raylet, GCS, idle
workers); the object store figures are the raylet's, about a second old.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from forkref._memory.report import MemoryReport

__all__ = ["ObjectStoreUse", "RayMemoryReport", "object_store_use"]


@dataclass(frozen=True, repr=False)
class ObjectStoreUse:
    """One Ray node's object store, in bytes, as its raylet last reported it (about every second).

    Attributes:
        node_id: Ray's id of the node (hex).
        node_ip: the node's address.
        used: bytes held in the node's store: objects put there and copies
            fetched for tasks that ran on the node.
        capacity: the store's size (``object_store_memory``).
    """

    __module__ = "forkref"

    node_id: str
    node_ip: str
    used: int
    capacity: int

    def __repr__(self) -> str:
        return (
            f"<forkref.ObjectStoreUse node {self.node_ip} ({self.node_id[:8]}): "
            f"{self.used / 2**20:,.1f} of {self.capacity / 2**20:,.1f} MiB used>"
        )


@dataclass(frozen=True, repr=False)
class RayMemoryReport(MemoryReport):
    """:class:`forkref.MemoryReport` of a Ray pool's workers, plus the object stores.

    ``processes`` holds one record per live actor (role
    ``"ray worker@<node ip>"``), measured by psutil inside the actor: its
    pid is a pid on that node. ``object_stores`` has one record per alive
    node; it is empty, and ``object_store_error`` says why, when Ray would
    not tell (the figures come from ``ray._private.state``, which a Ray
    release may change).
    """

    __module__ = "forkref"

    object_stores: tuple[ObjectStoreUse, ...] = ()
    object_store_error: str | None = None

    def table(self) -> str:
        """The workers' table, then one line per node's object store (or why there is none)."""
        lines = [super().table()]
        for store in self.object_stores:
            lines.append(
                f"object store {store.node_ip}: {store.used / 2**20:,.1f} of "
                f"{store.capacity / 2**20:,.1f} MiB used"
            )
        if self.object_store_error:
            lines.append(f"object stores: {self.object_store_error}")
        return "\n".join(lines)

    def _repr_extra(self) -> str:
        used = sum(store.used for store in self.object_stores)
        return f"{super()._repr_extra()}, object stores {used / 2**20:,.1f} MiB used"


def object_store_use(ray: types.ModuleType) -> tuple[tuple[ObjectStoreUse, ...], str | None]:
    """Per-node object store use, or ``((), why)`` if Ray would not tell."""
    try:
        from ray._private import state

        total = state.total_resources_per_node()
        free = state.available_resources_per_node()
        stores = []
        for node in ray.nodes():
            node_id = node["NodeID"]
            if not node.get("Alive") or node_id not in total:
                continue
            capacity = int(total[node_id].get("object_store_memory", 0))
            available = int(free.get(node_id, {}).get("object_store_memory", capacity))
            ip = str(node["NodeManagerAddress"])
            stores.append(ObjectStoreUse(node_id, ip, capacity - available, capacity))
        return tuple(stores), None
    except Exception as err:
        return (), f"Ray did not report its object stores ({err!r})"
