"""The registry and its references: keys, MACs, counting, forgeries, fork safety."""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import secrets
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkref import NotInheritedError
from forkref._refs.registry import Reference, collect_references, registry


class Payload:
    def __init__(self, n: int) -> None:
        self.n = n


@pytest.fixture(scope="module")
def live_refs() -> list[tuple[Reference, Payload]]:
    """Several live registrations, so a corrupted key has neighbours to land on."""
    reg = registry()
    objs = [Payload(i) for i in range(50)]
    refs = [(reg.register(o), o) for o in objs]
    yield refs
    for ref, _ in refs:
        reg.release(ref)


@pytest.mark.smoke
def test_register_lookup_release_roundtrip() -> None:
    reg = registry()
    before = len(reg)
    obj = Payload(1)
    ref = reg.register(obj)
    assert reg.lookup(ref) is obj
    assert len(reg) == before + 1
    reg.release(ref)
    assert len(reg) == before
    with pytest.raises(NotInheritedError, match="every handle to it was released"):
        reg.lookup(ref)


def test_registration_is_counted_and_deduplicated() -> None:
    reg = registry()
    before = len(reg)
    obj = Payload(2)
    first, second = reg.register(obj), reg.register(obj)
    assert first == second
    assert len(reg) == before + 1
    reg.release(first)
    assert reg.lookup(second) is obj  # one registration still holds it
    reg.release(second)
    assert len(reg) == before
    reg.release(second)  # releasing again is harmless
    assert len(reg) == before


def test_keys_are_random_not_sequential() -> None:
    reg = registry()
    refs = [reg.register(Payload(i)) for i in range(100)]
    try:
        keys = {r.key for r in refs}
        assert len(keys) == 100
        assert all(len(k) == 16 for k in keys)
        ints = sorted(int.from_bytes(k, "big") for k in keys)
        # Sequential or clustered keys would sit close together.
        assert min(b - a for a, b in itertools.pairwise(ints)) > 2**64
    finally:
        for r in refs:
            reg.release(r)


def test_reference_pickles_small_and_roundtrips() -> None:
    ref = registry().register(Payload(3))
    try:
        data = pickle.dumps(ref)
        assert len(data) < 200
        assert pickle.loads(data) == ref
    finally:
        registry().release(ref)


def test_serials_increase_and_last_serial_tracks_them() -> None:
    reg = registry()
    a, b = Payload(1), Payload(2)
    ra = reg.register(a)
    rb = reg.register(b)
    try:
        assert reg.serial(rb) > reg.serial(ra)
        assert reg.last_serial() >= reg.serial(rb)
    finally:
        reg.release(ra)
        reg.release(rb)
    with pytest.raises(NotInheritedError):
        reg.serial(ra)


def test_foreign_and_forged_references_say_why(live_refs: list[tuple[Reference, Payload]]) -> None:
    ref, _ = live_refs[0]
    reg = registry()
    foreign = dataclasses.replace(ref, tree=secrets.token_bytes(8))
    with pytest.raises(NotInheritedError, match="another process tree"):
        reg.lookup(foreign)
    forged = dataclasses.replace(ref, key=secrets.token_bytes(16))
    with pytest.raises(NotInheritedError, match="corrupted or forged"):
        reg.lookup(forged)
    with pytest.raises(NotInheritedError, match="not one"):
        reg.lookup(("not", "a", "reference"))  # type: ignore[arg-type]


def _mutations(ref: Reference) -> st.SearchStrategy[Reference]:
    def flip(data: bytes) -> st.SearchStrategy[bytes]:
        return st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)).map(
            lambda t: data[: t[0]] + bytes([data[t[0]] ^ t[1]]) + data[t[0] + 1 :]
        )

    return st.one_of(
        flip(ref.key).map(lambda k: dataclasses.replace(ref, key=k)),
        flip(ref.mac).map(lambda m: dataclasses.replace(ref, mac=m)),
        flip(ref.tree).map(lambda t: dataclasses.replace(ref, tree=t)),
        st.integers().filter(lambda p: p != ref.origin_pid).map(
            lambda p: dataclasses.replace(ref, origin_pid=p)
        ),
        st.text(max_size=50).filter(lambda n: n != ref.typename).map(
            lambda n: dataclasses.replace(ref, typename=n)
        ),
        st.binary(max_size=40).map(lambda k: dataclasses.replace(ref, key=k)),
    )


@settings(max_examples=3000, deadline=None)
@given(data=st.data())
def test_mutated_references_never_resolve(
    data: st.DataObject, live_refs: list[tuple[Reference, Payload]]
) -> None:
    index = data.draw(st.integers(0, len(live_refs) - 1))
    ref, _ = live_refs[index]
    mutated = data.draw(_mutations(ref))
    with pytest.raises(NotInheritedError):
        registry().lookup(mutated)


@settings(max_examples=2000, deadline=None)
@given(
    key=st.binary(min_size=16, max_size=16),
    mac=st.binary(min_size=16, max_size=16),
    pid=st.integers(0, 2**22),
    name=st.text(max_size=30),
)
def test_forged_references_never_resolve(
    key: bytes, mac: bytes, pid: int, name: str, live_refs: list[tuple[Reference, Payload]]
) -> None:
    tree = live_refs[0][0].tree  # the right tree id is public; the secret is not
    with pytest.raises(NotInheritedError):
        registry().lookup(Reference(tree, key, pid, name, mac))


def test_collect_references_sees_handles_pickled_in_block() -> None:
    import forkref

    a, b = forkref.share(Payload(1)), forkref.share(Payload(2))
    with collect_references() as outer:
        pickle.dumps(a)
        with collect_references() as inner:
            pickle.dumps({"x": [b]})
        pickle.dumps((a,))
    assert inner == [b.ref]
    assert outer == [a.ref, a.ref]
    pickle.dumps(a)  # outside any block: nothing recorded, nothing breaks
    a.release()
    b.release()


@pytest.mark.timeout(60)
@pytest.mark.forks_with_threads  # the point of the test
def test_fork_while_other_threads_register_does_not_deadlock() -> None:
    """The registry lock is taken around fork, so a child never inherits it held."""
    reg = registry()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            reg.release(reg.register(Payload(0)))

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            pid = os.fork()
            if pid == 0:  # child: the lock must be usable at once
                try:
                    reg.release(reg.register(Payload(1)))
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        for t in threads:
            t.join()
