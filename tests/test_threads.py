"""forkref._fork.threads outside a kernel: foreign threads warn once per call site, with advice
that keeps zero copy; stdout is flushed before the fork. The kernel's side (its threads
recognised, its stream locks taken around the fork) runs in a real kernel:
tests/test_notebook.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator

import pytest

import forkref
from forkref._fork import threads as _threads


def sqr(x: int) -> int:
    return x * x


@pytest.fixture
def user_thread() -> Iterator[threading.Thread]:
    """A plain user thread running for the test, and forkref's warned call sites forgotten."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="some-user-thread")
    thread.start()
    saved = set(_threads._warned_sites)
    _threads._warned_sites.clear()
    try:
        yield thread
    finally:
        _threads._warned_sites.clear()
        _threads._warned_sites.update(saved)
        stop.set()
        thread.join()


def _fork_a_pool() -> None:
    with forkref.Pool(1) as pool:
        assert pool.apply(sqr, (3,)) == 9


def test_foreign_thread_warns_once_per_call_site(user_thread: threading.Thread) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with forkref.Pool(1) as pool:
                pool.apply(sqr, (1,))  # the same line forks twice: one warning
        _fork_a_pool()  # another call site: one more
    ours = [w for w in caught if issubclass(w.category, forkref.ForkWarning)]
    assert [w.filename for w in ours] == [__file__, __file__]
    assert ours[0].lineno != ours[1].lineno
    text = str(ours[0].message)
    assert "1 other thread(s)" in text
    assert "some-user-thread" in text
    # The advice keeps zero-copy inheritance: no start method without fork.
    assert "zero-copy" in text
    assert "forkserver" not in text
    assert "spawn" not in text


def test_no_warning_without_foreign_threads() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fork_a_pool()
    assert not [w for w in caught if issubclass(w.category, forkref.ForkWarning)]


def test_outside_ipython_no_thread_is_the_kernels(user_thread: threading.Thread) -> None:
    assert _threads.kernel_threads() == set()
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    assert user_thread in _threads.threads_to_warn_about(others)


def test_output_printed_before_the_fork_appears_once() -> None:
    """Block-buffered stdout (a file, a pipe): flushed before the fork, as multiprocessing does.

    Otherwise the fork server and each worker write the parent's pending text again.
    """
    program = textwrap.dedent(
        """
        import forkref
        print("before the fork")
        pool = forkref.Pool(2)
        assert pool.map(abs, [-1, -2, -3, -4]) == [1, 2, 3, 4]
        pool.close()
        pool.join()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before the fork\n"


def test_outside_a_kernel_no_stream_lock_is_taken() -> None:
    assert _threads._kernel_streams() == []
    with _threads.fork_safe_stdio():
        pass
