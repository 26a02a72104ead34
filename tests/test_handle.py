"""share() handles with real forks and the stdlib pools."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import gc
import multiprocessing as mp
import os
import pickle
import weakref
from typing import Any

import pytest

import forkref
from forkref import NotInheritedError, ReleasedError, share
from forkref._refs.registry import registry
from helpers import read_n

FORK = mp.get_context("fork")


class BigObject:
    """Refuses to be pickled: any test that pickles one fails loudly."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.payload = bytearray(n)

    def __reduce__(self) -> Any:
        raise AssertionError("a BigObject was pickled")

    def compute_something(self) -> int:
        return self.n * 2


def child(bo: BigObject) -> int:
    return bo.compute_something()


def identity_info(*args: Any, **kwargs: Any) -> tuple[int, list[int], dict[str, int]]:
    return os.getpid(), [id(a) for a in args], {k: id(v) for k, v in kwargs.items()}


@dataclasses.dataclass
class Holder:
    item: Any


def unpack_and_id(box: Any) -> list[int]:
    """Ids of the objects a nested argument resolved to."""
    if isinstance(box, Holder):
        return [id(box.item)]
    if isinstance(box, dict):
        return [id(v) for v in box.values()]
    return [id(x) for x in box]


def call_it(fn: Any) -> Any:
    return fn()


def same_in_one_task(a: Any, b: Any) -> bool:
    return a is b


def pid_and_id(obj: Any) -> tuple[int, int]:
    return os.getpid(), id(obj)


def load_and_read(data: bytes) -> int:
    return read_n(pickle.loads(data))


# -- in the sharing process ------------------------------------------------


@pytest.mark.smoke
def test_handle_pickles_small_and_resolves_to_original_here() -> None:
    small, big = BigObject(10), BigObject(50_000_000)
    with share(small) as hs, share(big) as hb:
        assert hb.get() is big
        data_small, data_big = pickle.dumps(hs), pickle.dumps(hb)
        assert len(data_big) < 300
        assert len(data_big) == len(data_small)  # size does not grow with the object
        assert pickle.loads(data_big) is big


def test_same_object_twice_gives_same_reference_and_one_entry() -> None:
    before = len(registry())
    obj = BigObject(1)
    h1, h2 = share(obj), share(obj)
    assert h1 == h2
    assert h1.ref == h2.ref
    assert share(h1) is h1
    assert len(registry()) == before + 1
    del h1
    assert h2.get() is obj  # still alive through the other handle
    del h2
    gc.collect()
    assert len(registry()) == before


def test_entry_and_object_die_with_last_handle() -> None:
    before = len(registry())
    obj = BigObject(1)
    alive = weakref.ref(obj)
    handle = share(obj)
    del obj
    gc.collect()
    assert alive() is not None  # the handle keeps it alive
    del handle
    gc.collect()
    assert alive() is None
    assert len(registry()) == before


def test_release_is_explicit_idempotent_and_context_managed() -> None:
    before = len(registry())
    with share(BigObject(1)) as handle:
        assert len(registry()) == before + 1
    assert handle.released
    assert len(registry()) == before
    handle.release()  # twice is fine
    with pytest.raises(ReleasedError, match="released"):
        handle.get()
    with pytest.raises(ReleasedError, match="released"):
        pickle.dumps(handle)


def test_unavailable_placeholder_raises_on_every_use_but_repr() -> None:
    handle = share(BigObject(1))
    data = pickle.dumps(handle)
    handle.release()
    ghost = pickle.loads(data)  # never raises while unpickling
    assert isinstance(ghost, forkref._share.handle.Unavailable)
    assert "forkref.Unavailable" in repr(ghost)
    uses = [
        lambda: ghost.n,
        lambda: len(ghost),
        lambda: iter(ghost),
        lambda: ghost[0],
        ghost,  # calling it
        lambda: ghost + 1,
        lambda: ghost == 1,
        lambda: bool(ghost),
        lambda: str(ghost),
        lambda: pickle.dumps(ghost),
        lambda: setattr(ghost, "x", 1),
    ]
    for use in uses:
        with pytest.raises(NotInheritedError, match="BigObject"):
            use()


# -- stdlib multiprocessing.Pool under fork ---------------------------------


@pytest.mark.smoke
@pytest.mark.timeout(60)
def test_seed_scenario_stdlib_pool_no_bigobject_pickled() -> None:
    bo1, bo2 = BigObject(10_000_000), BigObject(20_000_000)
    refs = [share(bo1), share(bo2)]
    with FORK.Pool(2) as pool:
        assert pool.map(child, refs) == [20_000_000, 40_000_000]


@pytest.mark.timeout(60)
def test_worker_gets_the_original_object_at_the_same_address() -> None:
    a, b = BigObject(1), BigObject(2)
    ha, hb = share(a), share(b)
    with FORK.Pool(2) as pool:
        _, ids, kw = pool.apply(identity_info, (ha, 5), {"other": hb})
    assert ids[0] == id(a)  # the inherited object itself, not a copy
    assert kw["other"] == id(b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda h: (h, h), id="tuple"),
        pytest.param(lambda h: [h], id="list"),
        pytest.param(lambda h: {"k": h}, id="dict"),
        pytest.param(Holder, id="dataclass"),
    ],
)
def test_handles_resolve_nested_in_containers(wrap: Any) -> None:
    obj = BigObject(3)
    handle = share(obj)
    with FORK.Pool(2) as pool:
        ids = pool.apply(unpack_and_id, (wrap(handle),))
    assert set(ids) == {id(obj)}


@pytest.mark.timeout(60)
def test_handle_inside_partial_and_same_object_within_a_worker() -> None:
    obj = BigObject(4)
    handle = share(obj)
    with FORK.Pool(1) as pool:
        assert pool.apply(call_it, (functools.partial(child, handle),)) == 8
        assert pool.apply(same_in_one_task, (handle, handle)) is True
        seen = pool.map(pid_and_id, [handle] * 6, chunksize=1)
    assert {i for _, i in seen} == {id(obj)}


@pytest.mark.timeout(60)
def test_late_share_fails_the_task_not_the_stdlib_pool() -> None:
    with FORK.Pool(2) as pool:
        late = share(BigObject(5))  # after the workers forked
        result = pool.apply_async(child, (late,))
        # BigObject refuses pickling, so shared memory cannot stand in either.
        with pytest.raises(NotInheritedError, match="shared after this process was forked"):
            result.get(timeout=30)
        # The worker survived the bad reference: the pool still serves tasks.
        assert pool.map(abs, [-1, -2]) == [1, 2]


@pytest.mark.timeout(60)
def test_mutations_are_snapshots_per_fork() -> None:
    obj = BigObject(1)
    handle = share(obj)
    with FORK.Pool(1) as pool:
        obj.n = 99  # after the fork: the worker keeps what it inherited
        assert pool.apply(read_n, (handle,)) == 1
    assert obj.n == 99
    with FORK.Pool(1) as pool:
        assert pool.apply(read_n, (handle,)) == 99


# -- stdlib ProcessPoolExecutor under fork -----------------------------------


@pytest.mark.smoke
@pytest.mark.timeout(60)
def test_stdlib_executor_resolves_and_survives_late_share() -> None:
    early = share(BigObject(6))
    with cf.ProcessPoolExecutor(2, mp_context=FORK) as ex:
        assert ex.submit(child, early).result(timeout=30) == 12
        late = share(BigObject(7))  # workers were forked at the first submit
        with pytest.raises(NotInheritedError, match="BigObject"):
            ex.submit(child, late).result(timeout=30)
        assert ex.submit(child, early).result(timeout=30) == 12  # not broken


# -- workers that were not forked -------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_non_fork_workers_fail_clearly_for_an_unpicklable_object(method: str) -> None:
    """Shared memory needs one pickle; an object that refuses it fails the task, not the pool."""
    handle = share(BigObject(8))
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context(method)) as ex:
        with pytest.raises(NotInheritedError, match=r"spawn or forkserver.*could not pickle it"):
            ex.submit(child, handle).result(timeout=60)
        assert ex.submit(abs, -3).result(timeout=60) == 3


@pytest.mark.timeout(60)
def test_foreign_reference_from_another_tree_fails_in_worker() -> None:
    """A reference minted by an unrelated process never resolves here."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as other_tree:
        foreign_bytes = other_tree.apply(_mint_reference_elsewhere)
    with FORK.Pool(1) as pool:
        _ = share(BigObject(1))  # this tree has a secret of its own
        with pytest.raises(NotInheritedError, match="another process tree"):
            pool.apply(load_and_read, (foreign_bytes,))


def _mint_reference_elsewhere() -> bytes:
    global _KEEP
    obj = BigObject(9)
    _KEEP = share(obj)
    return pickle.dumps(_KEEP)


_KEEP: Any = None


def _mutated_pickles(data: bytes, ref: Any, count: int) -> list[bytes]:
    """Copies of a pickled handle with one byte flipped inside the token's fields."""
    import random

    rng = random.Random(1234)
    spans = []
    for field in (ref.tree, ref.key, ref.mac):
        start = data.index(field)
        spans.append((start, start + len(field)))
    out = []
    for _ in range(count):
        lo, hi = rng.choice(spans)
        pos = rng.randrange(lo, hi)
        out.append(data[:pos] + bytes([data[pos] ^ rng.randrange(1, 256)]) + data[pos + 1 :])
    return out


def resolve_all(blobs: list[bytes]) -> list[str]:
    """In a worker: load each blob and report what it became, never raising."""
    seen = []
    for blob in blobs:
        obj = pickle.loads(blob)
        if isinstance(obj, forkref._share.handle.Unavailable):
            try:
                obj.n
            except NotInheritedError:
                seen.append("error")
                continue
        seen.append(f"object:{id(obj)}")
    return seen


@pytest.mark.timeout(120)
def test_mutated_pickled_handles_never_resolve_in_a_worker() -> None:
    objs = [BigObject(i) for i in range(20)]
    handles = [share(o) for o in objs]
    blobs = []
    for h in handles:
        blobs += _mutated_pickles(pickle.dumps(h), h.ref, 100)
    assert resolve_all(blobs) == ["error"] * len(blobs)  # here, in the sharing process
    with FORK.Pool(1) as pool:
        assert pool.apply(resolve_all, (blobs,)) == ["error"] * len(blobs)
        assert pool.apply(read_n, (handles[3],)) == 3  # the genuine one still resolves
