"""Memory reports of a ``backend="ray"`` pool: its actors, and each node's object store.

Non-goals: no memory figures of Ray's own processes (raylet, GCS, idle
workers); the object store figures are the raylet's, about a second old.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from forkref._memory.report import MemoryReport

__all__ = ["ObjectStoreUse", "RayMemoryReport", "object_store_use"]


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
