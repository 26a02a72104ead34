"""Pickling tasks for Ray workers: the Ray task encoder and its cloudpickle-based pickler.

Non-goals: no pickling of its own; everything that is not a forkref
Reference, a shared handle or a big value goes to Ray's cloudpickle as is.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Callable
from typing import Any

from forkref._share.autoshare import AutoSharer
from forkref._share.taskpickle import TaskEncoder

__all__ = ["RayTaskEncoder"]


class RayTaskEncoder(TaskEncoder):
    """The task encoder for Ray workers: functions go through cloudpickle.

    A Ray worker does not share the driver's ``__main__``, so the fork path's
    functions-by-value (code over the worker's copy of the module's globals)
    would miss the driver's globals. Functions and classes that cannot be
    imported by name on a worker (lambdas, closures, anything from
    ``__main__``) are pickled by cloudpickle instead, with the globals they use;
    the values they capture go through the pool's policy as in the fork
    path: above ``share_threshold`` they travel by reference, through the
    object store.
    """

    def __init__(self, sharer: AutoSharer) -> None:
        super().__init__(sharer, fork=False, start_method="ray")
        self.pickler_class = _pickler_class()

    destination = "a Ray worker (cloudpickle)"

    def _fix(self, culprit: str, fn: Any) -> str:
        return "make it picklable, or create it in the worker (an initializer, or inside the task)"


_PICKLER: Any = None


def _pickler_class() -> Any:
    """The cloudpickle-based task pickler (made once: it subclasses Ray's cloudpickle)."""
    global _PICKLER
    if _PICKLER is None:
        from ray import cloudpickle

        class RayTaskPickler(cloudpickle.Pickler):  # type: ignore[misc]
            def __init__(self, file: Any, encoder: TaskEncoder) -> None:
                super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
                self._encoder = encoder

            def reducer_override(self, obj: Any) -> Any:
                reduced = self._encoder._reduce(obj)
                if reduced is NotImplemented:
                    return super().reducer_override(obj)
                return reduced

            def _dynamic_function_reduce(self, func: Any) -> Any:
                # What the function captures (closure cells, globals it uses,
                # defaults) goes by reference above share_threshold, as in the
                # fork path: a lambda over a big frame sends the frame once.
                reduced = super()._dynamic_function_reduce(func)
                _, slotstate = reduced[2]
                captured = self._encoder.sharer.consider_captured
                where = lambda: f"a value captured by {func.__qualname__}"  # noqa: E731
                closure = slotstate.get("__closure__")
                if closure:
                    slotstate["__closure__"] = tuple(
                        _captured_cell(c, captured, where) for c in closure
                    )
                slotstate["__globals__"] = {
                    k: captured(v, where) for k, v in slotstate["__globals__"].items()
                }
                if slotstate.get("__defaults__"):
                    slotstate["__defaults__"] = tuple(
                        captured(v, where) for v in slotstate["__defaults__"]
                    )
                return reduced

        _PICKLER = RayTaskPickler
    return _PICKLER


def _captured_cell(cell: Any, captured: Callable[..., object], where: Callable[[], str]) -> Any:
    try:
        value = cell.cell_contents
    except ValueError:  # an empty cell (a variable not assigned yet)
        return cell
    new = captured(value, where)
    return cell if new is value else types.CellType(new)
