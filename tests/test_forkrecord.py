"""Fork records: what a fork records, what a child resolves, and that nothing else changes.

Every test forks for real (``os.fork``) and has the child report back through
a pipe; the child exits with ``os._exit`` so nothing of pytest runs there.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import sys
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import forkref
from forkref._refs import forkrecord

pytestmark = pytest.mark.timeout(60)


class Obj:
    """Weakref-able and refuses pickling: a resolution that pickles fails loudly."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> Any:
        raise AssertionError("an Obj was pickled")


class Wide:
    """Over 512 bytes, so malloc (not pymalloc) allocates it: a freed one's address
    comes back with the next one made, as reliably as an allocator can be asked to."""

    __slots__ = ("__weakref__", "n", *(f"s{i}" for i in range(100)))

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> Any:
        raise AssertionError("a Wide was pickled")


def in_child(body: Callable[[], object]) -> Any:
    """Fork, run ``body`` in the child, return what it returned (as JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            out = json.dumps({"ok": body()})
        except BaseException as err:
            out = json.dumps({"error": f"{type(err).__name__}: {err}"})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]


def forked_child() -> tuple[int, int, int]:
    """Fork a child that waits for one line on a pipe, then unpickles it and reports.

    Returns (pid, write end, read end): send the pickled bytes as hex and a
    newline, read back one JSON line.
    """
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(to_child_w)
        os.close(from_child_r)
        with os.fdopen(to_child_r) as inp:
            line = inp.readline()
        try:
            obj = pickle.loads(bytes.fromhex(line))
            try:
                report = {"id": id(obj), "n": obj.n}
            except forkref.NotInheritedError as err:
                report = {"error": str(err)}
        except BaseException as err:
            report = {"error": repr(err)}
        os.write(from_child_w, json.dumps(report).encode())
        os._exit(0)
    os.close(to_child_r)
    os.close(from_child_w)
    return pid, to_child_w, from_child_r


def ask_child(child: tuple[int, int, int], data: bytes) -> dict[str, Any]:
    pid, w, r = child
    os.write(w, data.hex().encode() + b"\n")
    os.close(w)
    with os.fdopen(r) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return dict(report)


# -- what a fork records ------------------------------------------------------------


@pytest.mark.smoke
def test_object_alive_at_fork_resolves_in_child_shared_after_the_fork() -> None:
    obj = Obj(7)  # a local of this frame when the fork happens
    child = forked_child()
    handle = forkref.share(obj)  # after the fork
    assert handle.ref.record  # the parent proved it lived at that fork
    report = ask_child(child, pickle.dumps(handle))
    assert report == {"id": id(obj), "n": 7}  # the inherited object itself, never pickled


def object_at(address: int, make: Callable[[], object]) -> tuple[object | None, list[object]]:
    """Make objects until one lands at ``address``; the others are kept (returned), so
    that the allocator moves on. ``(None, kept)`` if none did."""
    kept: list[object] = []
    for _ in range(20_000):
        candidate = make()
        if id(candidate) == address:
            return candidate, kept
        kept.append(candidate)
    return None, kept


def give_up(child: tuple[int, int, int]) -> None:
    os.kill(child[0], 9)
    os.waitpid(child[0], 0)
    os.close(child[1])
    os.close(child[2])
    pytest.skip("the allocator did not reuse the address")


def test_object_born_at_a_dead_ones_address_is_never_taken_for_it() -> None:
    old = Wide(1)
    address = id(old)
    child = forked_child()  # the child holds `old` at `address`, and its record
    assert forkrecord.find(old) is not None
    del old
    gc.collect()
    new, _kept = object_at(address, lambda: Wide(2))
    if new is None:
        give_up(child)
    assert id(new) == address
    handle = forkref.share(new)
    assert not handle.ref.record  # born after the fork: no record proves otherwise
    report = ask_child(child, pickle.dumps(handle))
    # Never the old object at that address: Obj refuses pickling, so the
    # child cannot get it through shared memory either, and says why.
    assert "error" in report, report
    assert "shared after this process was forked" in report["error"]


def test_record_made_at_a_later_fork_does_not_match_an_older_child() -> None:
    old = Wide(1)
    address = id(old)
    older = forked_child()  # records `old`
    del old
    gc.collect()
    new, kept = object_at(address, lambda: Wide(2))
    if new is None:
        give_up(older)
    del kept
    newer = forked_child()  # records `new`, at the same address, with a new token
    handle = forkref.share(new)
    assert handle.ref.record
    data = pickle.dumps(handle)
    assert ask_child(newer, data) == {"id": address, "n": 2}
    report = ask_child(older, data)  # holds `old` at that address: must not return it
    assert "error" in report
    assert "shared after this process was forked" in report["error"]


def test_one_level_into_containers_and_a_local_objects_attributes() -> None:
    inner = [Obj(1), Obj(2)]
    holder = {"a": Obj(3), "deep": {"b": Obj(4)}}
    box = Obj(5)
    box.attr = Obj(6)  # type: ignore[attr-defined]
    deep = holder["deep"]["b"]
    del deep  # only reachable two levels down now
    forkrecord.record(sys._getframe())
    assert forkrecord.find(inner[0]) is not None
    assert forkrecord.find(holder["a"]) is not None
    assert forkrecord.find(box.attr) is not None  # type: ignore[attr-defined]
    assert forkrecord.find(holder["deep"]["b"]) is None  # two levels: not looked at
    assert forkrecord.find(inner) is None  # a plain list cannot be weakly referenced


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 instances always have a dict")
def test_looking_into_a_local_object_leaves_no_dict_on_it() -> None:
    box = Obj(1)
    box.attr = Obj(2)  # type: ignore[attr-defined]
    assert not any(type(r) is dict for r in gc.get_referents(box))  # attributes kept inline
    forkrecord.record(sys._getframe())
    assert forkrecord.find(box.attr) is not None  # type: ignore[attr-defined]
    # Reading box.__dict__ would have made CPython build one for good.
    assert not any(type(r) is dict for r in gc.get_referents(box))


def test_containers_are_looked_into_up_to_the_limit() -> None:
    many = [Obj(i) for i in range(forkrecord.EXPAND_LIMIT + 100)]
    forkrecord.record(sys._getframe())
    assert forkrecord.find(many[forkrecord.EXPAND_LIMIT - 1]) is not None
    assert forkrecord.find(many[forkrecord.EXPAND_LIMIT]) is None


GLOBAL_OBJ = Obj(11)


_DEEP: list[list[Obj]] = [[]]  # two levels down from a global: never looked at


def _recurse(depth: int) -> None:
    here = Obj(depth)  # a local of every frame
    _DEEP[0].append(here)
    if depth > 0:
        _recurse(depth - 1)
    else:
        forkrecord.record(sys._getframe())


def test_a_deep_stack_is_looked_at_from_both_ends() -> None:
    import threading

    found: dict[str, bool] = {}

    def outermost() -> None:  # a thread's stack: this frame is among its outermost
        marker = Obj(-1)
        _recurse(forkrecord.INNER_FRAMES * 3)
        made = _DEEP[0]  # outermost first
        found["outer"] = forkrecord.find(marker) is not None
        found["inner"] = forkrecord.find(made[-1]) is not None
        found["middle"] = forkrecord.find(made[len(made) // 2]) is not None

    _DEEP[0].clear()
    thread = threading.Thread(target=outermost)
    thread.start()
    thread.join()
    _DEEP[0].clear()
    assert found == {"outer": True, "inner": True, "middle": False}


def test_a_huge_module_is_looked_at_up_to_its_most_recent_globals() -> None:
    import types

    module = types.ModuleType("forkref_test_huge_module")
    names = vars(module)
    for i in range(forkrecord.NAMESPACE_LIMIT + 100):
        names[f"g{i}"] = Obj(i)
    code = compile("def here():\n    return sys._getframe()\n", module.__name__, "exec")
    names["sys"] = sys
    exec(code, names)
    del names  # a local dict would be looked into itself
    forkrecord.record(module.here())
    newest = getattr(module, f"g{forkrecord.NAMESPACE_LIMIT + 99}")
    assert forkrecord.find(newest) is not None
    assert forkrecord.find(module.g0) is None  # beyond the limit, the oldest


def test_module_globals_are_recorded() -> None:
    forkrecord.record(sys._getframe())
    found = forkrecord.find(GLOBAL_OBJ)
    assert found is not None
    assert found.key == id(GLOBAL_OBJ)


def test_what_cannot_be_weakly_referenced_is_never_recorded() -> None:
    plain = [{"a": 1}, b"bytes", bytearray(10), (1, 2)]
    forkrecord.record(sys._getframe())
    for obj in plain:
        assert not forkrecord.weakrefable(obj)
        assert forkrecord.find(obj) is None
    handle = forkref.share(plain[0])
    assert not handle.ref.weakrefable
    assert not handle.ref.record


def test_an_object_keeps_the_first_fork_that_recorded_it() -> None:
    obj = Obj(1)
    forkrecord.record(sys._getframe(), token=111, seq=1)
    forkrecord.record(sys._getframe(), token=222, seq=2)
    found = forkrecord.find(obj)
    assert found is not None
    assert found.token == 111
    assert forkrecord.lookup(id(obj), 111) is obj
    assert forkrecord.lookup(id(obj), 222) is None  # another fork's token never matches


def test_a_dead_objects_entry_goes_with_it() -> None:
    obj = Obj(1)
    key = id(obj)
    forkrecord.record(sys._getframe(), token=333, seq=1)
    assert forkrecord.lookup(key, 333) is obj
    del obj
    gc.collect()
    assert forkrecord.lookup(key, 333) is None
    assert key not in forkrecord._table or forkrecord._table[key].token != 333


def test_last_fork_numbers_the_calling_threads_forks() -> None:
    before = forkrecord.last_fork()
    in_child(lambda: None)
    after = forkrecord.last_fork()
    assert after > before
    obj = Obj(1)
    in_child(lambda: None)
    found = forkrecord.find(obj)
    assert found is not None
    assert found.seq > after


def test_disabled_recording_records_nothing() -> None:
    previous = forkrecord.set_enabled(False)
    try:
        obj = Obj(1)
        in_child(lambda: None)
        assert forkrecord.find(obj) is None
    finally:
        forkrecord.set_enabled(previous)


def test_a_failing_scan_never_breaks_the_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("scan failed")

    monkeypatch.setattr(forkrecord, "record", broken)
    assert in_child(os.getpid) > 0


# -- no trace left on the frames ----------------------------------------------------


def _fork_then_delete() -> bool:
    big = Obj(1)
    alive = weakref.ref(big)
    in_child(lambda: None)  # the hook reads this frame's locals
    del big
    return alive() is not None


def test_a_local_deleted_after_the_fork_is_freed() -> None:
    # Python 3.10-3.12 keep the dict f_locals builds on the frame: without
    # clearing it, `big` would live on until the function returned.
    assert _fork_then_delete() is False


def _fork_with_locals_held() -> dict[str, Any]:
    a = 1
    held = locals()  # user code holding the snapshot: it must stay as it was
    in_child(lambda: None)
    return held


def test_a_locals_dict_held_by_user_code_is_left_alone() -> None:
    held = _fork_with_locals_held()
    assert held.get("a") == 1


def _fork_under_trace() -> tuple[int, list[int], int]:
    a, b = 1, [2]
    in_child(lambda: None)
    c = 3
    return a, b, c


def test_locals_survive_a_fork_under_a_trace_function() -> None:
    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = _fork_under_trace()
    finally:
        sys.settrace(old)
    assert result == (1, [2], 3)
