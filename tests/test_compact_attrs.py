"""compact_attrs(): one call converts a dataset object's big lists and dicts."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import forkref
from forkref import CompactDict, CompactError, CompactList


class Dataset:
    def __init__(self, n: int) -> None:
        self.root = "/data"
        self.annotations = [{"id": i, "file": f"{i}.jpg"} for i in range(n)]
        self.by_name = {f"{i}.jpg": i for i in range(n)}
        self.columns = {"input_ids": [[i, i + 1] for i in range(n)], "split": "train"}
        self.classes = ["cat", "dog"]
        self.transform = lambda x: x


class Slotted:
    __slots__ = ("items", "unset")

    def __init__(self, n: int) -> None:
        self.items = tuple(range(n))


def test_converts_big_lists_dicts_and_dicts_of_columns_only() -> None:
    ds = Dataset(50)
    annotations, by_name, columns = ds.annotations, ds.by_name, ds.columns
    done = forkref.compact_attrs(ds, min_items=50)
    assert done == {"annotations": 50, "by_name": 50, "columns": 50}
    assert isinstance(ds.annotations, CompactList)
    assert ds.annotations == annotations
    assert isinstance(ds.by_name, CompactDict)
    assert ds.by_name == by_name
    assert isinstance(ds.columns["input_ids"], CompactList)
    assert ds.columns == {"input_ids": columns["input_ids"], "split": "train"}
    assert list(ds.columns) == ["input_ids", "split"]
    assert ds.classes == ["cat", "dog"]  # small: left alone
    assert forkref.compact_attrs(ds, min_items=50) == {}  # already compact


def test_slots_and_the_threshold() -> None:
    obj = Slotted(100)
    assert forkref.compact_attrs(obj, min_items=101) == {}
    assert forkref.compact_attrs(obj, min_items=100) == {"items": 100}
    assert obj.items == list(range(100))


def test_an_attribute_that_cannot_be_compacted_is_named_with_the_fix() -> None:
    ds = Dataset(20)
    ds.hooks = [threading.Lock() for _ in range(20)]  # type: ignore[attr-defined]
    with pytest.raises(
        CompactError, match=r"attribute 'hooks' of the Dataset.*exclude=\['hooks'\]"
    ):
        forkref.compact_attrs(ds, min_items=20)
    done = forkref.compact_attrs(ds, min_items=20, exclude=["hooks"])
    assert "hooks" not in done
    assert isinstance(ds.hooks, list)  # type: ignore[attr-defined]
    with pytest.raises(CompactError, match="at least 1"):
        forkref.compact_attrs(ds, min_items=0)


def test_an_object_without_attributes_converts_nothing() -> None:
    value: Any = 3
    assert forkref.compact_attrs(value) == {}
