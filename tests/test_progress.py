"""forkref's progress bars: counts, options, failure, Ctrl-C, and no tqdm monitor thread at fork."""

from __future__ import annotations

import io
import sys
import threading
import warnings

import pytest
import tqdm
from tqdm.std import TMonitor

import forkref
from forkref._pools import progress as _progress
from forkref._pools.progress import Progress


def _bar_text(out: io.StringIO) -> str:
    """The last state a text bar drew (tqdm redraws with carriage returns)."""
    return out.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def _monitors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, TMonitor)]


def test_counts_items_to_the_total() -> None:
    out = io.StringIO()
    with Progress(25, {"file": out, "mininterval": 0}) as bar:
        for _ in range(5):
            bar.update(5)  # one finished chunk of 5 items
        assert bar.count == 25
    assert "25/25" in _bar_text(out)


def test_works_without_a_length() -> None:
    out = io.StringIO()
    with Progress(None, {"file": out, "mininterval": 0}) as bar:
        bar.update(3)
        bar.update(4)
    text = _bar_text(out)
    assert "7item" in text.replace(" ", "")
    assert "%" not in text  # no total, no percentage


def test_dict_options_reach_tqdm() -> None:
    out = io.StringIO()
    with Progress(4, {"file": out, "desc": "rows", "unit": "row", "mininterval": 0}) as bar:
        bar.update(4)
    text = _bar_text(out)
    assert text.startswith("rows:")
    assert "4/4" in text
    assert "row/s" in text


def test_false_means_no_bar() -> None:
    bar = Progress(10, False)
    bar.update(5)
    bar.close()
    assert not bar.enabled
    assert bar.count == 0


def test_unknown_option_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"tqdm does not accept these options .*colour_me"):
        Progress(3, {"colour_me": True, "file": io.StringIO()})
    with pytest.raises(TypeError, match="True, False or a dict"):
        Progress(3, "yes")  # type: ignore[arg-type]


def _fail_after(bar: Progress, n: int, error: BaseException) -> None:
    with bar:
        bar.update(n)
        raise error


def test_error_closes_the_bar_marked_failed() -> None:
    out = io.StringIO()
    bar = Progress(10, {"file": out})
    with pytest.raises(ValueError, match="boom"):
        _fail_after(bar, 3, ValueError("boom"))
    text = _bar_text(out)
    assert "3/10" in text
    assert "failed" in text
    bar.close()  # idempotent
    bar.update(1)  # ignored once closed
    assert bar.count == 3


def test_ctrl_c_closes_the_bar_and_propagates() -> None:
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        _fail_after(Progress(10, {"file": out}), 2, KeyboardInterrupt())
    assert "failed" in _bar_text(out)
    assert out.getvalue().endswith("\n")  # the line was finished, the terminal is clean


def test_updates_from_several_threads_add_up() -> None:
    out = io.StringIO()
    with Progress(400, {"file": out}) as bar:
        threads = [
            threading.Thread(target=lambda: [bar.update(1) for _ in range(100)])
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bar.count == 400


def test_plain_tqdm_starts_a_monitor_thread() -> None:
    """The control for the next test: a plain tqdm bar does start tqdm_monitor."""
    assert tqdm.tqdm.monitor_interval > 0
    bar = tqdm.tqdm(total=2, file=io.StringIO())
    try:
        assert _monitors(), "tqdm did not start its monitor: the next test would prove nothing"
    finally:
        bar.close()
        if tqdm.tqdm.monitor is not None:
            tqdm.tqdm.monitor.exit()  # joins the thread
            tqdm.tqdm.monitor = None
    assert not _monitors()


@pytest.mark.smoke
def test_forkref_bars_never_start_the_monitor_so_pools_fork_cleanly() -> None:
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", forkref.ForkWarning)
        warnings.simplefilter("error", DeprecationWarning)  # 3.12+: multi-threaded fork
        with Progress(8, {"file": out}) as bar:
            assert not _monitors()
            foreign = [t for t in threading.enumerate() if not t.name.startswith("forkref-")]
            assert foreign == [threading.main_thread()]
            with forkref.Pool(2) as pool:  # forks while the bar is open
                for n in pool.imap(abs, range(8)):
                    bar.update(1)
                    assert n >= 0
            assert not _monitors()
    assert "8/8" in _bar_text(out)


def test_missing_tqdm_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "_bar_class", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ModuleNotFoundError, match="pip install tqdm"):
        Progress(3, True)
    assert Progress(3, False).count == 0  # no bar asked: tqdm is not needed
