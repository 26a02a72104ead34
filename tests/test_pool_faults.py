"""Faults injected at each step of a task's trip (after CPython's test_deadlock.py).

Tiny objects whose ``__reduce__`` (or reconstructor) raises, exits or kills
the process at a chosen step: pickling the task in the parent, unpickling it
in the worker, pickling the result in the worker, unpickling it in the
parent. Every fault must end as a clear error on the affected call, never a
hang, and (except where the executor's contract says "broken") leave the
pool usable. Both pools, fork workers.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from typing import Any

import pytest

import forkref

pytestmark = pytest.mark.timeout(60)


def _raise_on_load() -> None:
    raise RuntimeError("error while unpickling")


def _exit_on_load() -> None:
    os._exit(7)


def _kill_on_load() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_in_parent_on_load() -> Any:
    if os.environ.get("FORKREF_TEST_ROLE") == "parent":
        raise RuntimeError("error while unpickling the result")
    return 1


def _exit_in_parent_on_load() -> Any:
    if os.environ.get("FORKREF_TEST_ROLE") == "parent":
        raise SystemExit(3)  # CPython's test_exit_during_result_unpickle_in_result_handler
    return 1


def _interrupt_in_parent_on_load() -> Any:
    if os.environ.get("FORKREF_TEST_ROLE") == "parent":
        raise KeyboardInterrupt
    return 1


class ExitAtResultUnpickle:
    def __reduce__(self) -> Any:
        return _exit_in_parent_on_load, ()


class InterruptAtResultUnpickle:
    def __reduce__(self) -> Any:
        return _interrupt_in_parent_on_load, ()


def return_exit_at_result_unpickle(_: Any = None) -> ExitAtResultUnpickle:
    return ExitAtResultUnpickle()


def return_interrupt_at_result_unpickle(_: Any = None) -> InterruptAtResultUnpickle:
    return InterruptAtResultUnpickle()


class ErrorAtPickle:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("error while pickling")


class ErrorAtUnpickle:
    def __reduce__(self) -> Any:
        return _raise_on_load, ()


class ExitAtUnpickle:
    def __reduce__(self) -> Any:
        return _exit_on_load, ()


class KillAtUnpickle:
    def __reduce__(self) -> Any:
        return _kill_on_load, ()


class ErrorAtResultUnpickle:
    def __reduce__(self) -> Any:
        return _raise_in_parent_on_load, ()


def identity(x: Any) -> Any:
    return x


def return_error_at_pickle(_: Any = None) -> ErrorAtPickle:
    return ErrorAtPickle()


def return_kill_at_pickle(_: Any = None) -> Any:
    class KillAtPickle:
        def __reduce__(self) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)
            return (int, ())

    return KillAtPickle()


def return_error_at_result_unpickle(_: Any = None) -> ErrorAtResultUnpickle:
    return ErrorAtResultUnpickle()


@pytest.fixture(autouse=True)
def parent_role(monkeypatch: pytest.MonkeyPatch) -> None:
    # Workers are forked after this is set; they clear it before running anything.
    monkeypatch.setenv("FORKREF_TEST_ROLE", "parent")


def _worker_role() -> None:
    os.environ["FORKREF_TEST_ROLE"] = "worker"


CASES = [
    # (name, function, argument, expected error type, message part)
    (
        "error at task pickle",
        identity,
        ErrorAtPickle(),
        forkref.TaskPicklingError,
        "(argument|item) 0",
    ),
    ("error at task unpickle", identity, ErrorAtUnpickle(), forkref.Error, "could not unpickle"),
    ("exit at task unpickle", identity, ExitAtUnpickle(), forkref.WorkerDiedError, "exit code 7"),
    ("kill at task unpickle", identity, KillAtUnpickle(), forkref.WorkerDiedError, "SIGKILL"),
    ("error at result pickle", return_error_at_pickle, None, forkref.TaskPicklingError, "result"),
    ("kill at result pickle", return_kill_at_pickle, None, forkref.WorkerDiedError, "SIGKILL"),
    (
        "error at result unpickle",
        return_error_at_result_unpickle,
        None,
        forkref.TaskPicklingError,
        "in the parent",
    ),
    # A BaseException there used to kill the dispatcher: the task's future stayed
    # pending for ever, and so did every later task of its batch (issue 8).
    (
        "SystemExit at result unpickle",
        return_exit_at_result_unpickle,
        None,
        forkref.TaskPicklingError,
        r"in the parent: SystemExit\(3\)",
    ),
    (
        "KeyboardInterrupt at result unpickle",
        return_interrupt_at_result_unpickle,
        None,
        forkref.TaskPicklingError,
        r"in the parent: KeyboardInterrupt",
    ),
]


@pytest.mark.parametrize(("name", "fn", "arg", "error", "text"), CASES, ids=[c[0] for c in CASES])
def test_pool_fault(name: str, fn: Any, arg: Any, error: type[Exception], text: str) -> None:
    with forkref.Pool(2, initializer=_worker_role) as p:
        assert p.apply(identity, (1,)) == 1
        with pytest.raises(error, match=text):
            p.apply(fn, (arg,))
        with pytest.raises(error, match=text):
            p.map(fn, [arg, arg])
        assert p.map(identity, range(10)) == list(range(10))  # still usable
        p.close()
        p.join()


@pytest.mark.parametrize(("name", "fn", "arg", "error", "text"), CASES, ids=[c[0] for c in CASES])
def test_executor_fault(name: str, fn: Any, arg: Any, error: type[Exception], text: str) -> None:
    with forkref.ProcessPoolExecutor(2, initializer=_worker_role) as ex:
        assert ex.submit(identity, 1).result(timeout=30) == 1
        future = ex.submit(fn, arg)
        with pytest.raises(error, match=text):
            future.result(timeout=30)
        if issubclass(error, forkref.WorkerDiedError):  # the stdlib contract: broken now
            with pytest.raises(forkref.BrokenPoolError):
                ex.submit(identity, 1)
        else:
            assert ex.submit(identity, 2).result(timeout=30) == 2


# -- review findings: a failed fork, a dead fork server, a worker dead mid-send -----------


def _nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_fork_fails_only_its_task_and_the_pool_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review finding 2 (e18): fork() can fail (EAGAIN: pid limit; ENOMEM).

    The fault is injected as CPython's tests do, at the one call that forks
    a generation; every other fork is real.
    """
    with forkref.Pool(2) as p:
        assert p.apply(abs, (-1,)) == 1
        pending = p.apply_async(_nap, (0.3,))
        late = forkref.share(bytearray(10))
        pickle.dumps(late)  # whatever a pickled handle opens (the export server) is open now
        fds = _open_fds()
        real_fork = os.fork

        def failing_fork() -> int:
            monkeypatch.setattr(os, "fork", real_fork)
            raise BlockingIOError(11, "Resource temporarily unavailable")

        monkeypatch.setattr(os, "fork", failing_fork)
        with pytest.raises(forkref.ForkError, match=r"cannot fork .* submit it again"):
            p.apply(len, (late,))
        assert _open_fds() == fds  # the new generation's control socket is closed
        assert pending.get(timeout=30) == 0.3  # the paused dispatcher was restarted
        assert p.apply(abs, (-2,)) == 2
        assert p.apply(len, (late,)) == 10  # a real fork now
        assert p._engine.generation == 2


def _ppid(_: object = None) -> int:
    return os.getppid()


def test_dead_fork_server_is_replaced_by_a_fresh_generation() -> None:
    """Review finding 9 (e12): workers are never forked from the dispatcher thread."""
    import time

    with forkref.Pool(2) as p:
        p.map(abs, range(4))
        [zygote] = p._engine.zygote_pids()
        os.kill(zygote, signal.SIGKILL)  # e.g. the OOM killer's pick
        deadline = time.monotonic() + 30
        while p._engine.zygote_pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not p._engine.zygote_pids()
        parents = set(p.map(_ppid, range(8), chunksize=1))
        assert os.getpid() not in parents  # forked by a fork server, not by a thread of ours
        assert parents <= set(p._engine.zygote_pids())
        assert p._engine.generation == 2


def test_complete_results_read_before_a_dead_workers_partial_one_are_kept() -> None:
    """Review finding 6 (e10): one read brings a whole result, then part of a big one,
    and the worker dies mid-send. The whole result must reach its task."""
    import socket

    from forkref._engine.wire import HDR, LEN, OK, READ_SIZE, read_messages

    parent, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent, worker:
        parent.setblocking(False)
        small = HDR.pack(1, OK) + b"A done"
        worker.sendall(LEN.pack(len(small)) + small)
        big_len = 4 * READ_SIZE
        worker.sendall(LEN.pack(big_len) + HDR.pack(2, OK) + b"x" * 1000)  # then it dies
        worker.close()
        buf = bytearray()
        messages = read_messages(parent.fileno(), buf)
        assert [bytes(m) for m in messages] == [small]
        with pytest.raises(EOFError):  # the next read finds the worker gone
            read_messages(parent.fileno(), buf)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt, SystemExit])
def test_a_raising_callback_ends_its_result_and_nothing_else(
    exc: type[BaseException], capfd: pytest.CaptureFixture[str]
) -> None:
    """A callback runs in the dispatcher: whatever it raises, its result still
    completes, the traceback is printed, and the pool keeps running tasks."""

    def callback(_: object) -> None:
        raise exc("raised by the callback")

    with forkref.Pool(2) as pool:
        first = pool.apply_async(abs, (-1,), callback=callback)
        failed = pool.apply_async(int, ("x",), error_callback=callback)
        assert first.get(timeout=30) == 1
        with pytest.raises(ValueError, match="invalid literal"):
            failed.get(timeout=30)
        assert pool.map(abs, [-2, -3]) == [2, 3]
    assert capfd.readouterr().err.count(f"{exc.__name__}: raised by the callback") == 2


def test_an_exception_escaping_the_dispatcher_breaks_the_pool_and_fails_what_is_pending(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A bug (here a KeyboardInterrupt injected into the thread's round) never
    leaves a result pending: the pool breaks, naming it, and says so on submit."""
    from forkref._engine import dispatcher as _dispatcher

    def broken(self: Any) -> int:
        raise KeyboardInterrupt("injected into the dispatcher")

    with forkref.Pool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]
        monkeypatch.setattr(_dispatcher.Dispatcher, "_update_poller", broken)
        pending = pool.apply_async(time.sleep, (30,))
        with pytest.raises(forkref.BrokenPoolError, match="dispatcher thread failed with Keyb"):
            pending.get(timeout=60)
        with pytest.raises(forkref.BrokenPoolError):
            pool.apply_async(abs, (-3,)).get(timeout=60)
    assert "injected into the dispatcher" in capfd.readouterr().err


def test_a_reply_read_in_a_round_that_then_fails_still_ends_its_task(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The round read the task's reply (it left the worker's books), then a bug
    raised before the reply was delivered: the task still ends, never pending."""
    from forkref._engine import workforce

    real = workforce.Workforce.check_deaths

    def broken(self: Any, completions: list[Any]) -> None:
        if completions:  # a reply is read and not yet delivered
            raise RuntimeError("injected after a reply was read")
        real(self, completions)

    with forkref.Pool(1) as pool:
        assert pool.map(abs, [-1]) == [1]
        monkeypatch.setattr(workforce.Workforce, "check_deaths", broken)
        result = pool.apply_async(abs, (-7,))
        assert result.get(timeout=60) == 7  # delivered as it was read
        with pytest.raises(forkref.BrokenPoolError, match="dispatcher thread failed"):
            pool.apply_async(abs, (-3,)).get(timeout=60)
    assert "injected after a reply was read" in capfd.readouterr().err


def test_a_dead_fork_server_fails_the_tasks_it_held_and_queued_and_the_pool_goes_on() -> None:
    """Running tasks die with their workers, queued ones fail naming the fork
    server, and the next submit forks a fresh generation: nothing stays pending."""
    with forkref.Pool(2) as p:
        running = [p.apply_async(time.sleep, (60,)) for _ in range(2)]
        queued = [p.apply_async(abs, (-i,)) for i in range(3)]
        deadline = time.monotonic() + 30
        while len(p.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        [zygote] = p._engine.zygote_pids()
        os.kill(zygote, signal.SIGKILL)
        for result in running:
            with pytest.raises(forkref.WorkerDiedError):
                result.get(timeout=60)
        for result in queued:
            with pytest.raises(forkref.BrokenPoolError, match=r"fork server .* died"):
                result.get(timeout=60)
        assert p.map(abs, [-4, -5]) == [4, 5]


def _missing_on_load() -> Any:
    raise AttributeError("Can't get attribute 'gone' on <module 'somewhere'>")


class MissingAtLoad:
    def __reduce__(self) -> Any:
        return _missing_on_load, ()


@pytest.mark.parametrize(
    ("method", "says", "never"),
    [
        ("fork", "define it before the first task", "importable"),
        ("spawn", "must be importable there", "define it before"),
    ],
)
def test_a_name_the_worker_cannot_find_is_explained_for_its_start_method(
    method: str, says: str, never: str
) -> None:
    """The message names the cause that holds for the start method in use."""
    import multiprocessing

    with forkref.Pool(1, context=multiprocessing.get_context(method)) as pool:
        with pytest.raises(forkref.Error, match="could not unpickle its task") as info:
            pool.apply(abs, (MissingAtLoad(),))
        assert says in str(info.value)
        assert never not in str(info.value)
        assert pool.apply(abs, (-1,)) == 1
