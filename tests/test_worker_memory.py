"""A forked worker that uses a shared DataFrame keeps only a sliver of it private."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import psutil
import pytest

import forkref
from helpers import frame

pd = pytest.importorskip("pandas")
np = pytest.importorskip("numpy")

SIZE = 256 * 2**20


def column_sums_and_uss(df: Any) -> tuple[float, int]:
    total = float(df.sum().sum())
    return total, psutil.Process().memory_full_info().uss


@pytest.mark.timeout(180)
def test_worker_uss_is_a_small_fraction_of_a_shared_frame() -> None:
    df = frame(SIZE, "abcd")
    expected = float(df.sum().sum())
    handle = forkref.share(df)
    with forkref.fork_hygiene(), mp.get_context("fork").Pool(2) as pool:
        results = pool.map(column_sums_and_uss, [handle] * 4, chunksize=1)
    assert all(total == pytest.approx(expected) for total, _ in results)
    worst = max(uss for _, uss in results)
    assert worst < 0.25 * SIZE, f"worker USS {worst / 2**20:.0f} MiB for a 256 MiB frame"


@pytest.mark.timeout(180)
def test_the_same_frame_passed_plainly_is_copied_into_each_worker() -> None:
    """The control: without share() the worker holds a private copy, so the bound above can fail."""
    df = frame(SIZE, "abcd")
    with mp.get_context("fork").Pool(1) as pool:
        _, uss = pool.apply(column_sums_and_uss, (df,))
    assert uss > 0.9 * SIZE
