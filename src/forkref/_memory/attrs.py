"""One call for a whole dataset object: its big lists and dicts become compact containers.

    obj.annotations  list of 1M dicts   ──> CompactList   (by column)
    obj.index        dict of 1M keys    ──> CompactDict
    obj.columns      {"ids": [...1M], "labels": [...1M]}
                                        ──> {"ids": CompactList, "labels": CompactList}
    obj.transform, obj.root, small lists  left as they are

Non-goals: no recursion into other objects (call it on them); attributes
are rebound, so code holding the old list keeps the old list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from forkref._errors import CompactError
from forkref._memory.compact import CompactList, compact
from forkref._memory.compactdict import CompactDict, compact_dict

__all__ = ["compact_attrs"]

DEFAULT_MIN_ITEMS = 10_000


def _attributes(obj: object) -> Iterator[tuple[str, Any]]:
    """The instance attributes of ``obj``: its ``__dict__`` and every ``__slots__`` entry set."""
    yield from list(getattr(obj, "__dict__", {}).items())
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                yield name, getattr(obj, name)


def _converted(value: Any, min_items: int) -> tuple[Any, int] | None:
    """The compact form of ``value`` and its item count, or None to leave it."""
    cls = type(value)
    if (cls is list or cls is tuple) and len(value) >= min_items:
        return compact(value), len(value)
    if cls is dict and len(value) >= min_items:
        return compact_dict(value), len(value)
    if cls is dict:  # a dict of columns: {"input_ids": [...], "labels": [...]}
        columns = {
            k: compact(v) for k, v in value.items() if type(v) is list and len(v) >= min_items
        }
        if columns:
            return {**value, **columns}, sum(len(c) for c in columns.values())
    return None


def compact_attrs(
    obj: object, min_items: int = DEFAULT_MIN_ITEMS, exclude: Iterable[str] = ()
) -> dict[str, int]:
    """Replace the big list, tuple and dict attributes of ``obj`` with compact containers.

    One call for a dataset, a config or a cache before workers start
    (a PyTorch ``Dataset`` before its ``DataLoader``, an object before a
    pool): every list or tuple attribute with at least ``min_items`` items
    becomes a :class:`~forkref.CompactList`, every such dict a
    :class:`~forkref.CompactDict`, and a dict whose values include such
    lists (a dict of columns) gets those values compacted. Workers then
    read them without copying them, forked or spawned.

    Returns:
        A dict mapping the name of each converted attribute to its number
        of items, empty when nothing was big enough.

    Raises:
        CompactError: an attribute holds an item that cannot be pickled, or
            cannot be set; the message names it (leave it out with
            ``exclude``).
    """
    if min_items < 1:
        raise CompactError(f"compact_attrs: min_items must be at least 1, not {min_items}")
    skipped, done = set(exclude), {}
    for name, value in _attributes(obj):
        if name in skipped or isinstance(value, (CompactList, CompactDict)):
            continue
        try:
            converted = _converted(value, min_items)
            if converted is not None:
                setattr(obj, name, converted[0])
        except (CompactError, AttributeError, TypeError) as exc:
            raise CompactError(
                f"compact_attrs: attribute {name!r} of the {type(obj).__qualname__} could not "
                f"be compacted: {exc}. Leave it as it is with exclude=[{name!r}]"
            ) from exc
        if converted is not None:
            done[name] = converted[1]
    return done
