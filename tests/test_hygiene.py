"""fork_hygiene(): gc frozen across the fork, restored afterwards."""

from __future__ import annotations

import gc
import multiprocessing as mp

import pytest

import forkref


def freeze_count_in_child() -> int:
    return gc.get_freeze_count()


@pytest.mark.smoke
def test_freezes_inside_and_restores_after() -> None:
    # CPython 3.12.1 starts with some objects frozen; forkref restores that level.
    before = gc.get_freeze_count()
    with forkref.fork_hygiene():
        assert gc.get_freeze_count() > before + 1000
        with forkref.fork_hygiene():  # nesting keeps it frozen
            pass
        assert gc.get_freeze_count() > before + 1000
    assert gc.get_freeze_count() <= before


def test_restores_even_when_the_block_raises() -> None:
    before = gc.get_freeze_count()
    with pytest.raises(RuntimeError), forkref.fork_hygiene():
        raise RuntimeError("boom")
    assert gc.get_freeze_count() <= before


def test_leaves_a_callers_own_freeze_alone() -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        with forkref.fork_hygiene():
            pass
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


@pytest.mark.timeout(60)
def test_children_forked_inside_start_with_the_heap_frozen() -> None:
    with forkref.fork_hygiene(), mp.get_context("fork").Pool(1) as pool:
        frozen = pool.apply(freeze_count_in_child)
    assert frozen > 0
