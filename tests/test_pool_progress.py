"""progress= on forkref's pools: the bar counts items (not chunks) to the end, with or
without a length, closes on errors and Ctrl-C, and never makes a fork unsafe."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tqdm.std import TMonitor

import forkref


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def fail_on_7(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x


def _final(out: io.StringIO) -> str:
    return out.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def _opts(out: io.StringIO) -> dict[str, Any]:
    return {"file": out, "mininterval": 0}


@pytest.fixture
def pool() -> Iterator[forkref.Pool]:
    with forkref.Pool(2) as p:
        yield p


N = 101  # tqdm's own process_map stops at 11/101 with chunksize=10


def _run_map(pool: forkref.Pool, chunksize: int, opts: dict[str, Any]) -> Any:
    return pool.map(square, range(N), chunksize, progress=opts)


def _run_starmap(pool: forkref.Pool, chunksize: int, opts: dict[str, Any]) -> Any:
    return pool.starmap(add, [(i, i) for i in range(N)], chunksize, progress=opts)


def _run_map_async(pool: forkref.Pool, chunksize: int, opts: dict[str, Any]) -> Any:
    return pool.map_async(square, range(N), chunksize, progress=opts).get(timeout=60)


def _run_starmap_async(pool: forkref.Pool, chunksize: int, opts: dict[str, Any]) -> Any:
    return pool.starmap_async(add, [(i, i) for i in range(N)], chunksize, progress=opts).get(60)


def _run_imap(pool: forkref.Pool, chunksize: int, opts: dict[str, Any]) -> Any:
    return list(pool.imap(square, range(N), chunksize, progress=opts))


def _run_imap_unordered(pool: forkref.Pool, chunksize: int, opts: dict[str, Any]) -> Any:
    return sorted(pool.imap_unordered(square, range(N), chunksize, progress=opts))


RUNNERS: dict[str, Callable[[forkref.Pool, int, dict[str, Any]], Any]] = {
    "map": _run_map,
    "starmap": _run_starmap,
    "map_async": _run_map_async,
    "starmap_async": _run_starmap_async,
    "imap": _run_imap,
    "imap_unordered": _run_imap_unordered,
}


@pytest.mark.parametrize("chunksize", [1, 10])
@pytest.mark.parametrize("method", list(RUNNERS))
def test_final_count_is_the_number_of_items(
    pool: forkref.Pool, method: str, chunksize: int
) -> None:
    out = io.StringIO()
    results = RUNNERS[method](pool, chunksize, _opts(out))
    assert len(results) == N
    assert f"{N}/{N}" in _final(out)
    assert "failed" not in out.getvalue()


@pytest.mark.smoke
@pytest.mark.parametrize("chunksize", [1, 10])
def test_generator_without_length(pool: forkref.Pool, chunksize: int) -> None:
    out = io.StringIO()
    gen = (i for i in range(N))
    assert list(pool.imap(square, gen, chunksize, progress=_opts(out))) == [
        i * i for i in range(N)
    ]
    final = _final(out).replace(" ", "")
    assert f"{N}item" in final
    assert "%" not in final  # no length, no percentage
    out = io.StringIO()
    assert len(pool.map(square, (i for i in range(N)), chunksize, progress=_opts(out))) == N
    assert f"{N}/{N}" in _final(out)  # map lists a generator first: the total is known


@pytest.mark.smoke
@pytest.mark.parametrize("chunksize", [1, 10])
def test_executor_map_counts_items(chunksize: int) -> None:
    out = io.StringIO()
    with forkref.ProcessPoolExecutor(2) as ex:
        results = list(ex.map(add, range(N), range(N), chunksize=chunksize, progress=_opts(out)))
    assert results == [2 * i for i in range(N)]
    assert f"{N}/{N}" in _final(out)


def test_default_bar_is_named_after_the_function(
    pool: forkref.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    pool.map(square, range(12), progress=True)
    err = capsys.readouterr().err
    assert "square: 100%" in err
    assert "12/12" in err


def test_error_closes_the_bar_as_failed(pool: forkref.Pool) -> None:
    out = io.StringIO()
    with pytest.raises(ValueError, match="seven"):
        pool.map(fail_on_7, range(20), chunksize=1, progress=_opts(out))
    assert "failed" in _final(out)
    assert "20/20" not in _final(out)
    out = io.StringIO()
    with pytest.raises(ValueError, match="seven"):
        list(pool.imap(fail_on_7, range(20), chunksize=5, progress=_opts(out)))
    assert "failed" in _final(out)
    out = io.StringIO()
    with forkref.ProcessPoolExecutor(1) as ex, pytest.raises(ValueError, match="seven"):
        list(ex.map(fail_on_7, range(20), progress=_opts(out)))
    assert "failed" in _final(out)


def test_an_executor_map_refused_at_submit_closes_its_bar() -> None:
    ex = forkref.ProcessPoolExecutor(1)
    ex.shutdown()
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(square, range(5), progress=_opts(out))
    assert "failed" in _final(out)  # closed, not left open with no iterator to close it


def test_a_ctrl_c_while_submitting_ends_the_map_and_interrupts(
    pool: forkref.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pool._engine, "submit_many", interrupted)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        pool.map_async(square, range(10), chunksize=2, progress=_opts(out))
    assert "failed" in _final(out)  # every chunk ended, so the bar closed


def test_ctrl_c_closes_the_bar(pool: forkref.Pool) -> None:
    out = io.StringIO()
    pool.map(square, range(4))  # workers forked before the timer thread exists
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # also when ignored
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            pool.map(time.sleep, [0.05] * 4 + [30, 30], chunksize=1, progress=_opts(out))
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert "4/6" in _final(out)
    assert "failed" in _final(out)
    assert out.getvalue().endswith("\n")


def test_a_bar_open_across_a_generation_fork_warns_nothing() -> None:
    late = [{"i": i} for i in range(10)]  # a list: needs a new generation, not shared memory
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", forkref.ForkWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with forkref.Pool(2) as pool:
            pool.map(square, range(4), progress=_opts(out))  # the first generation
            handle = forkref.share(late)  # late: the next map forks a new generation
            it = pool.imap(len, [handle] * 8, progress=_opts(out))
            assert list(it) == [10] * 8
            assert pool._engine.generation >= 2
    assert not [t for t in threading.enumerate() if isinstance(t, TMonitor)]
    assert "8/8" in _final(out)
