"""The late-object policy: how an object shared after a generation forked reaches its workers.

:func:`~forkref._engine.generations.late_object_route` is a pure function of
the registration serial, the object's size and kind, the parent's size and
the pool's width; each route and the threshold between shared memory and a
new generation are checked here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from forkref._engine.generations import (
    EXPORT_SECONDS_PER_BYTE,
    FORK_SECONDS_PER_BYTE,
    Route,
    exports_cleanly,
    late_object_route,
)

GiB = 2**30


def route(**changes: Any) -> Route:
    args: dict[str, Any] = dict(
        registered=10,
        generation=5,
        exports_cleanly=True,
        size=1000,
        parent_rss=GiB,
        processes=4,
    )
    args.update(changes)
    return late_object_route(**args)


def threshold(parent_rss: int, processes: int) -> float:
    """The size in bytes above which an export costs more than the forks it saves."""
    return (1 + processes) * parent_rss * FORK_SECONDS_PER_BYTE / EXPORT_SECONDS_PER_BYTE


@pytest.mark.parametrize("registered", [0, 4, 5])
def test_registered_up_to_the_generation_serial_is_inherited(registered: int) -> None:
    # Whatever else is true of it: even unknown size, not exportable.
    assert route(registered=registered, exports_cleanly=False, size=None) is Route.INHERITED


def test_one_registered_after_the_generation_is_late() -> None:
    assert route(registered=6) is not Route.INHERITED


def test_a_late_object_that_does_not_export_cleanly_needs_a_new_generation() -> None:
    assert route(exports_cleanly=False, size=1) is Route.NEW_GENERATION


def test_a_late_object_of_unknown_size_needs_a_new_generation() -> None:
    assert route(size=None) is Route.NEW_GENERATION


@pytest.mark.parametrize(("parent_rss", "processes"), [(GiB, 4), (GiB, 0), (8 * GiB, 16)])
def test_shared_memory_below_the_threshold_a_new_generation_above(
    parent_rss: int, processes: int
) -> None:
    edge = threshold(parent_rss, processes)
    below, above = int(edge * 0.99), int(edge * 1.01) + 1
    common = dict(parent_rss=parent_rss, processes=processes)
    assert route(size=below, **common) is Route.SHARED_MEMORY
    assert route(size=above, **common) is Route.NEW_GENERATION


def test_the_threshold_is_about_a_hundred_megabytes_per_gib_and_fork() -> None:
    # 20 ms per GiB per fork against 2 GB/s of export: 40 MB per GiB per fork.
    assert threshold(GiB, 0) == pytest.approx(40e6, rel=0.01)
    assert threshold(GiB, 4) == pytest.approx(200e6, rel=0.01)


def test_more_workers_make_a_new_generation_dearer() -> None:
    size = int(threshold(GiB, 2) * 1.5)
    assert route(size=size, processes=2) is Route.NEW_GENERATION
    assert route(size=size, processes=4) is Route.SHARED_MEMORY


def test_with_nothing_to_copy_a_fork_always_wins() -> None:
    assert route(size=1, parent_rss=0) is Route.NEW_GENERATION


@pytest.mark.parametrize(
    ("obj", "clean"),
    [
        (b"bytes", True),
        (bytearray(b"mutable"), False),
        ("text", False),
        ([1, 2], False),
        (np.arange(3), True),
        (np.array(["a", None], dtype=object), False),
        (pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]}), True),
        (pd.DataFrame({"a": [1, 2], "s": ["x", "y"]}), False),
        (pd.Series([1.0, 2.0]), True),
        (pd.Series(["x"]), False),
        (pa.array([1, 2]), True),
    ],
)
def test_exports_cleanly(obj: Any, clean: bool) -> None:
    assert exports_cleanly(obj) is clean
