"""One suite, three ways to pass a big argument: share() handle, automatic, plain pickling.

Each way must compute the same results on both pools; the by-reference ways
must hand the worker the parent's very object (same ``id`` in the forked
worker, never a pickled copy), and the plain way must pickle it.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import forkref
from forkref._refs.registry import registry

pytestmark = pytest.mark.timeout(60)

MiB = 2**20


class NoPickle:
    """A big object that refuses to be pickled: proves it travels by reference."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> Any:
        raise pickle.PicklingError("NoPickle was pickled")


def identity_and_size(obj: Any, extra: int = 0) -> tuple[int, int]:
    size = obj.payload if isinstance(obj, NoPickle) else obj
    return id(obj), len(size) + extra


def nested_size(bundle: dict[str, Any]) -> int:
    return sum(len(v) for v in bundle["items"])


class Model:
    def __init__(self, weights: Any) -> None:
        self.weights = weights

    def predict(self, x: int) -> int:
        return int(self.weights[x]) + 1


def make_frame() -> Any:
    import pandas as pd

    return pd.DataFrame({"a": range(300_000), "b": [1.5] * 300_000})


def frame_total(df: Any, i: int) -> tuple[int, float]:
    return id(df), float(df["b"].sum()) + i


MODES = ["handle", "auto", "plain"]


def pass_as(mode: str, obj: Any) -> Any:
    return forkref.share(obj) if mode == "handle" else obj


def pool_for(mode: str, **kwargs: Any) -> forkref.Pool:
    if mode == "plain":
        return forkref.Pool(2, share_threshold=None, **kwargs)
    return forkref.Pool(2, auto_share=(mode == "auto"), **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_big_bytes(mode: str) -> None:
    blob = os.urandom(2 * MiB)
    with pool_for(mode) as p:
        results = p.starmap(identity_and_size, [(pass_as(mode, blob), i) for i in range(6)])
    assert [size for _, size in results] == [len(blob) + i for i in range(6)]
    ids = {i for i, _ in results}
    if mode == "plain":
        assert id(blob) not in ids  # pickled: a copy
    else:
        assert ids == {id(blob)}  # immutable: by reference even without auto_share


@pytest.mark.parametrize("mode", MODES)
def test_big_dataframe_and_the_warning(mode: str) -> None:
    df = make_frame()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pool_for(mode, share_threshold=MiB) if mode != "plain" else pool_for(mode) as p:
            results = p.starmap(frame_total, [(pass_as(mode, df), i) for i in range(4)])
            also = p.starmap(frame_total, [(pass_as(mode, df), i) for i in range(4)])
    expected = float(df["b"].sum())
    assert [t for _, t in results] == [expected + i for i in range(4)]
    assert [t for _, t in also] == [t for _, t in results]
    perf = [w for w in caught if issubclass(w.category, forkref.PerformanceWarning)]
    if mode in ("handle", "auto"):
        assert {i for i, _ in results} == {id(df)}
        assert not perf
    else:
        assert id(df) not in {i for i, _ in results}
        assert not perf  # share_threshold=None: pickled silently, as asked


def test_big_mutable_without_auto_share_warns_once_per_call_site() -> None:
    df = make_frame()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with forkref.Pool(2) as p:
            for _ in range(3):  # one call site, three calls
                p.starmap(frame_total, [(df, i) for i in range(4)])
    perf = [w for w in caught if issubclass(w.category, forkref.PerformanceWarning)]
    assert len(perf) == 1
    message = str(perf[0].message)
    assert "item 0 of the iterable[0]" in message
    assert "DataFrame" in message
    assert "MiB" in message
    assert "forkref.share" in message
    assert "auto_share=True" in message
    assert perf[0].filename == __file__


@pytest.mark.parametrize("mode", MODES)
def test_unpicklable_big_object(mode: str) -> None:
    big = NoPickle(b"z" * (2 * MiB))
    with pool_for(mode) as p:
        if mode == "plain":
            with pytest.raises(forkref.TaskPicklingError, match="argument 0"):
                p.apply(identity_and_size, (big,))
        else:
            assert p.apply(identity_and_size, (pass_as(mode, big),)) == (id(big), 2 * MiB)


@pytest.mark.parametrize("mode", MODES)
def test_nested_in_containers_and_keywords(mode: str) -> None:
    items = [b"a" * (2 * MiB), b"b" * (3 * MiB)]
    bundle = {"items": [pass_as(mode, x) for x in items]}
    with pool_for(mode) as p:
        assert p.apply(nested_size, (), {"bundle": bundle}) == 5 * MiB
        assert p.map(nested_size, [bundle] * 3) == [5 * MiB] * 3


@pytest.mark.parametrize("mode", MODES)
def test_callable_holding_a_big_object(mode: str) -> None:
    import numpy as np

    weights = np.arange(MiB, dtype=np.int64)  # 8 MiB, mutable
    model = Model(pass_as(mode, weights) if mode == "handle" else weights)
    bound = functools.partial(identity_and_size, extra=1)
    with pool_for(mode) as p, warnings.catch_warnings():
        warnings.simplefilter("ignore", forkref.PerformanceWarning)
        assert p.map(model.predict, [1, 2, 3]) == [2, 3, 4]
        assert p.apply(bound, (b"x" * (2 * MiB),))[1] == 2 * MiB + 1


@pytest.mark.parametrize("mode", MODES)
def test_executor_with_each_mode(mode: str) -> None:
    blob = os.urandom(2 * MiB)
    kwargs: dict[str, Any] = {"share_threshold": None} if mode == "plain" else {}
    with forkref.ProcessPoolExecutor(2, auto_share=(mode == "auto"), **kwargs) as ex:
        futures = [ex.submit(identity_and_size, pass_as(mode, blob), i) for i in range(4)]
        results = [f.result(timeout=30) for f in futures]
        mapped = list(ex.map(identity_and_size, [pass_as(mode, blob)] * 3, range(3)))
    assert [s for _, s in results] == [len(blob) + i for i in range(4)]
    assert [s for _, s in mapped] == [len(blob) + i for i in range(3)]
    assert (id(blob) in {i for i, _ in results}) == (mode != "plain")


def test_auto_shared_object_registered_once_and_released_at_close() -> None:
    before = len(registry())
    blob = b"q" * (2 * MiB)
    with forkref.Pool(2) as p:
        p.map(len, [blob] * 8, chunksize=1)
        p.map(len, [blob] * 8, chunksize=1)
        assert len(p._engine.sharer) == 1
        assert p._engine.generation == 1  # shared before the first fork: no new generation
        p.close()
        p.join()
    assert len(registry()) == before


def test_late_auto_shared_object_forks_a_generation_and_dropped_ones_are_released() -> None:
    # str, not bytes: a late bytes object this small goes through shared memory
    # instead of a new generation (see test_pool_transport.py).
    with forkref.Pool(2) as p:
        first = "1" * (2 * MiB)
        assert p.apply(len, (first,)) == 2 * MiB
        del first  # the caller is done with it
        second = "2" * (3 * MiB)
        assert p.apply(len, (second,)) == 3 * MiB  # registered after the fork: generation 2
        assert p._engine.generation == 2
        assert len(p._engine.sharer) == 1  # `first` was idle and dropped at the fork: released


def test_alternating_two_live_objects_forks_no_generation_per_switch() -> None:
    """Review finding 7 (e21): an idle object the caller still holds stays registered."""
    a, b = "a" * (2 * MiB), "b" * (2 * MiB)  # str: late ones fork (bytes would export)
    with forkref.Pool(2) as p:
        p.apply(len, (a,))
        for i in range(10):
            assert p.apply(len, (a if i % 2 else b,)) == 2 * MiB
        assert p._engine.generation == 2  # a forked the first, b the second; then none
        assert len(p._engine.sharer) == 2


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from([b"B" * (2 * MiB), "S" * (2 * MiB)]),  # big immutables: by reference
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def test_arguments_round_trip() -> None:
    """Whatever mix of small, big and nested values: the worker sees equal values."""
    with forkref.Pool(2) as pool:

        @settings(max_examples=40, deadline=None)
        @given(
            args=st.lists(_values, max_size=3),
            kwargs=st.dictionaries(st.sampled_from("abc"), _values),
        )
        def check(args: list[Any], kwargs: dict[str, Any]) -> None:
            assert pool.apply(echo, args, kwargs) == (tuple(args), kwargs)
            assert pool.map(echo, args) == [((a,), {}) for a in args]

        check()


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


# -- review findings 7 and 11: what forks, what is sized ---------------------------------


def test_a_new_lambda_or_closure_per_call_forks_no_generation() -> None:
    """Review finding 7 (e13, e14): lambdas and closures go by value (code + captured values)."""

    def make(i: int) -> Any:
        return lambda: i * 2

    with forkref.Pool(2) as p:
        p.apply(abs, (1,))
        assert [p.apply(make(i)) for i in range(8)] == [i * 2 for i in range(8)]
        results = [p.apply_async(lambda i=i: i) for i in range(8)]
        assert [r.get(timeout=30) for r in results] == list(range(8))
        assert p._engine.generation == 1


def test_closure_sees_small_captured_state_at_submit_and_big_as_a_snapshot() -> None:
    """The closure policy: small captured values are pickled with the task; big ones
    travel by reference (the worker sees them as they were when it forked)."""
    small = [0]
    big = bytearray(2 * MiB)

    def read_small() -> int:
        return small[0]

    def read_big() -> int:
        return big[0]

    with forkref.Pool(1) as p:
        assert p.apply(read_big) == 0  # the first task: `big` is registered, then workers fork
        assert p.apply(read_small) == 0
        small[0] = 5
        big[0] = 7
        assert p.apply(read_small) == 5
        assert p.apply(read_big) == 0  # snapshot: the generation forked before the change
        assert p._engine.generation == 1


def test_recursive_closure_and_unpicklable_capture_still_work() -> None:
    lock = threading.Lock()

    def fact(n: int) -> int:
        return 1 if n <= 1 else n * fact(n - 1)

    with forkref.Pool(1) as p:
        assert p.apply(fact, (5,)) == 120
        def locked() -> bool:
            return lock.locked()

        assert p.apply(locked) is False  # captures a lock: the closure goes by reference


def test_buffers_and_deques_are_sized_and_warned_about() -> None:
    """Review finding 11 (e17): array.array and deque were pickled without a warning."""
    import array
    import collections

    from forkref._share.autoshare import estimate_size

    arr = array.array("d", bytes(4 * MiB))
    dq = collections.deque(range(300_000))
    assert estimate_size(arr) == 4 * MiB
    assert (estimate_size(dq) or 0) > 2 * MiB
    assert estimate_size(range(10**9)) is None  # pickles as three ints
    with forkref.Pool(1) as p:
        with pytest.warns(forkref.PerformanceWarning, match="array.array"):
            assert p.apply(len, (arr,)) == arr.buffer_info()[1]
        with pytest.warns(forkref.PerformanceWarning, match="deque"):
            assert p.apply(len, (dq,)) == 300_000
