"""The public surface: what forkref exports, where it says it lives, and that it is typed."""

from __future__ import annotations

import inspect
import pickle
from importlib import resources

import forkref


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(forkref) if not name.startswith("_")}
    assert set(forkref.__all__) == public


def test_public_classes_live_in_forkref() -> None:
    for name in forkref.__all__:
        obj = getattr(forkref, name)
        if inspect.isclass(obj):
            assert obj.__module__ == "forkref", name


def test_public_names_are_documented() -> None:
    for name in forkref.__all__:
        assert inspect.getdoc(getattr(forkref, name)), name


def test_every_exception_is_a_forkref_error_and_picklable() -> None:
    for name in forkref.__all__:
        obj = getattr(forkref, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, (forkref.Error, Warning)), name
            err = obj("message")
            again = pickle.loads(pickle.dumps(err))
            assert type(again) is obj
            assert str(again) == "message"


def test_ships_py_typed() -> None:
    assert resources.files("forkref").joinpath("py.typed").is_file()
