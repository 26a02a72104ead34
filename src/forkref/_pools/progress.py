"""Progress bars for forkref's pools: ``progress=True`` or a dict of tqdm options.

A pool makes one :class:`Progress` per call, tells it how many *items* each
finished task covered (a chunk of 10 items advances the bar by 10, so the
bar ends at the number of items, not of chunks), and closes it when the call
ends, failed or not::

    caller's thread                    forkref's dispatcher thread (task callbacks)
    Progress(total, option)  ──────►   bar.update(len(chunk))  per finished chunk
    ...                                ...
    bar.close(failed=...)    ◄──────   last result, an error, or Ctrl-C

The bar is ``tqdm.auto``'s: a widget in a notebook, text on stderr elsewhere.
Counting happens in the callback of each finished chunk, *before* the
result is handed over, so a caller that sees the last result also sees the
final count.

Why a subclass of tqdm: tqdm starts a *monitor thread* (``tqdm_monitor``)
with its first bar, and that thread takes tqdm's locks. forkref forks
workers while a bar is open; a fork while another thread holds a lock can
leave the lock held forever in the child, and forkref's pools warn
(:class:`forkref.ForkWarning`) about any foreign thread at fork. forkref's
bars set ``monitor_interval = 0`` on their own class, so they never start
that thread; bars the user makes with tqdm directly keep tqdm's default.
For the same reason a pool's bar draws under forkref's fork lock (the
``guard``): the dispatcher thread draws from task callbacks, and a
generation must never fork while that thread holds tqdm's lock.

Non-goals: no rate or ETA of our own (tqdm's), no nested bars per worker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

__all__ = ["Progress", "ProgressOption", "bar_class", "counted", "fork_guard"]

#: What ``progress=`` accepts: True/False, or a dict of tqdm options.
ProgressOption = bool | Mapping[str, Any]

_INSTALL = "pip install tqdm (a dependency of forkref: was forkref installed with --no-deps?)"
_bar_class: type[Any] | None = None
_bar_lock = threading.Lock()


def bar_class() -> type[Any]:
    """``tqdm.auto.tqdm`` with its monitor thread turned off (see the module docstring).

    Raises:
        ModuleNotFoundError: tqdm is not installed; the message says how to install it.
    """
    global _bar_class
    with _bar_lock:
        if _bar_class is None:
            try:
                from tqdm.auto import tqdm
            except ImportError as err:
                raise ModuleNotFoundError(
                    f"forkref progress bars need tqdm, which is not installed: {_INSTALL}",
                    name="tqdm",
                ) from err
            # A class attribute: tqdm reads cls.monitor_interval when it makes a bar.
            _bar_class = type("ForkrefBar", (tqdm,), {"monitor_interval": 0})
        return _bar_class


def _options(option: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """The tqdm keyword arguments ``option`` asks for, or None for no bar."""
    if isinstance(option, bool):
        return {} if option else None
    if isinstance(option, Mapping):
        bad = [k for k in option if not isinstance(k, str)]
        if bad:
            raise TypeError(f"progress= options must be tqdm keyword names (str), not {bad[0]!r}")
        return dict(option)
    raise TypeError(
        f"progress= takes True, False or a dict of tqdm options, not {type(option).__name__}"
    )


class Progress:
    """One progress bar over the items of one pool call.

    Args:
        total: the number of items, or None when the iterable has no length
            (the bar then counts up with a rate, without a percentage).
        option: ``True`` for a default bar, ``False`` for none (every method
            is then a no-op), or a dict of tqdm options (``desc``, ``unit``,
            ``leave``, ``file``, ``disable``, ...) passed to ``tqdm.auto.tqdm``.
        desc: the default description, used unless ``option`` sets ``desc``.
        guard: returns a lock held around every draw (pools: :func:`fork_guard`).

    ``update`` may be called from any thread; ``close`` is idempotent and
    safe in ``__del__``-like paths. As a context manager the bar closes as
    failed when the block raises (KeyboardInterrupt included).

    Raises:
        TypeError: ``option`` is neither a bool nor a mapping of str keys, or
            tqdm does not accept one of its keys.
        ModuleNotFoundError: tqdm is not installed.
    """

    def __init__(
        self,
        total: int | None,
        option: ProgressOption,
        *,
        desc: str | None = None,
        guard: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self._bar: Any = None
        self._lock = threading.Lock()
        self._guard = guard if guard is not None else contextlib.nullcontext
        self._closed = False
        options = _options(option)
        if options is None:
            return
        options.setdefault("total", total)
        options.setdefault("unit", "item")
        if desc is not None:
            options.setdefault("desc", desc)
        self._bar = _make_bar(bar_class(), options)

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown (False for ``option=False``)."""
        return self._bar is not None

    @property
    def count(self) -> int:
        """Items counted so far (0 without a bar)."""
        return int(self._bar.n) if self._bar is not None else 0

    def update(self, n_items: int) -> None:
        """``n_items`` more items are done (one finished task covers its whole chunk)."""
        if self._bar is None or n_items <= 0:
            return
        with self._guard(), self._lock:
            if not self._closed:
                self._bar.update(n_items)

    def note(self, text: str) -> None:
        """Show ``text`` after the counts (what is running now) and redraw."""
        if self._bar is None:
            return
        with self._guard(), self._lock:
            if not self._closed:
                self._bar.set_postfix_str(text, refresh=True)

    def close(self, failed: bool = False) -> None:
        """Close the bar; ``failed`` leaves it marked as stopped early. Idempotent."""
        if self._bar is None:
            return
        with self._guard(), self._lock:
            if self._closed:
                return
            self._closed = True
            if failed:
                # Text bars keep the count where it stopped; tqdm's notebook
                # widget turns red by itself when closed short of its total.
                self._bar.set_postfix_str("failed", refresh=False)
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)


def fork_guard() -> AbstractContextManager[Any]:
    """forkref's fork lock: no generation forks while a pool's bar draws."""
    from forkref._fork import safe as _forking

    return _forking.FORK_LOCK  # looked up each time: a forked child gets a fresh one


def counted(
    bar: Progress | None, on_done: Callable[[bool, Any], None]
) -> Callable[[bool, Any], None]:
    """Wrap a chunk's ``on_done(ok, results)``: count its items first, then hand it over."""
    if bar is None or not bar.enabled:
        return on_done

    def done(ok: bool, value: Any) -> None:
        if ok and isinstance(value, list):
            bar.update(len(value))
        on_done(ok, value)

    return done


def _make_bar(cls: type[Any], options: dict[str, Any]) -> Any:
    from tqdm import TqdmKeyError

    try:
        return cls(**options)
    except (TqdmKeyError, TypeError) as err:
        raise TypeError(
            f"progress={options!r}: tqdm does not accept these options ({err}); "
            "pass keyword arguments of tqdm.tqdm, e.g. {'desc': 'rows', 'unit': 'row'}"
        ) from err
