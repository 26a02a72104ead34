"""forkref.explain: one test per route, each checked against what the pool really does."""

from __future__ import annotations

import multiprocessing as mp
import warnings

import pytest

import forkref
from forkref._refs.registry import registry
from helpers import frame


def _references_in_task(pool: forkref.Pool, arg: object) -> int:
    """Objects a real task with ``arg`` made the pool register (0: it was pickled by value)."""
    before = len(registry())
    pool.apply(len, (arg,))
    return len(registry()) - before


@pytest.mark.smoke
def test_big_mutable_argument_is_pickled_and_explain_says_so() -> None:
    df = frame(4 * 2**20)
    why = forkref.explain(df)
    assert why.route == "pickle"
    assert why.per == "task"
    assert why.size == pytest.approx(4 * 2**20, rel=0.01)
    assert why.seconds is not None
    assert why.seconds > 0
    assert "auto_share" in why.reason
    assert "PerformanceWarning" in why.reason
    assert why.fix is not None
    assert "forkref.share(obj)" in why.fix
    # The pool agrees: it warns and pickles.
    with forkref.Pool(1) as pool, pytest.warns(forkref.PerformanceWarning):
        assert _references_in_task(pool, df) == 0


def test_auto_share_makes_it_a_fork_reference() -> None:
    df = frame(4 * 2**20)
    why = forkref.explain(df, auto_share=True)
    assert why.route == "fork reference"
    assert "snapshot" in why.reason
    assert why.fix is None
    with forkref.Pool(1, auto_share=True) as pool:
        assert _references_in_task(pool, df) == 1


def test_big_immutable_goes_by_reference_and_late_through_shared_memory() -> None:
    blob = b"x" * (4 * 2**20)
    why = forkref.explain(blob)
    assert why.route == "fork reference"
    assert "immutable" in why.reason
    # 4 MiB of bytes exports in ~2 ms, far less than forking this process 3 times.
    assert why.late_route == "shared memory"
    assert why.late_per == "once"
    with forkref.Pool(1) as pool:
        assert _references_in_task(pool, blob) == 1


def test_late_unexportable_object_needs_a_new_generation() -> None:
    records = [{"i": i} for i in range(50_000)]
    why = forkref.explain(records, auto_share=True)
    assert why.route == "fork reference"
    assert why.late_route == "fork reference"
    assert "new generation" in why.late_reason
    assert "list does not go through shared memory" in why.late_reason


def test_small_argument_is_pickled_without_a_fix() -> None:
    why = forkref.explain([1, 2, 3])
    assert why.route == "pickle"
    assert "share_threshold" in why.reason
    assert why.fix is None
    assert forkref.explain(7).fix is None


def test_handle_under_spawn_goes_through_shared_memory() -> None:
    df = frame(2**20)
    with forkref.share(df) as handle:
        forked = forkref.explain(handle)
        spawned = forkref.explain(handle, context=mp.get_context("spawn"))
    assert forked.route == "fork reference"
    assert "explicit forkref.share() handle" in forked.reason
    assert spawned.route == "shared memory"
    assert spawned.per == "once"
    assert spawned.fix is not None
    assert "fork" in spawned.fix


def test_spawn_pool_pickles_plain_arguments() -> None:
    why = forkref.explain(b"x" * (4 * 2**20), context=mp.get_context("spawn"))
    assert why.route == "pickle"
    assert "not forked" in why.reason


def test_unknown_size_is_pickled_and_says_why() -> None:
    class Opaque:
        __slots__ = ()

    why = forkref.explain(Opaque())
    assert why.route == "pickle"
    assert why.size is None
    assert "cannot be estimated" in why.reason


def test_threshold_none_turns_automatic_sharing_off() -> None:
    why = forkref.explain(b"x" * (4 * 2**20), share_threshold=None)
    assert why.route == "pickle"
    assert "share_threshold=None" in why.reason


def test_text_form_names_route_cost_reason_and_fix() -> None:
    text = str(forkref.explain(frame(4 * 2**20)))
    assert text.startswith("pandas.DataFrame of about 4.0 MiB: pickle, about ")
    assert "why: " in text
    assert "fix: " in text
    assert "already forked" in text


def test_explain_registers_nothing_and_warns_nothing() -> None:
    df = frame(4 * 2**20)
    before = registry().last_serial()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forkref.explain(df)
        forkref.explain(df, auto_share=True)
    assert registry().last_serial() == before


def test_the_performance_warning_points_to_explain() -> None:
    df = frame(4 * 2**20)
    with forkref.Pool(1) as pool, pytest.warns(forkref.PerformanceWarning) as caught:
        pool.apply(len, (df,))
    assert "print(forkref.explain(obj))" in str(caught[0].message)
