"""forkref.Pool run the way CPython's pool tests run multiprocessing.Pool, plus what forkref adds.

The stdlib behaviour runs under every start method (``make_pool``, the
``pool`` fixture), as CPython's tests do; what forkref adds on top of fork
(generations, lambdas, fork servers) runs under fork. Every test uses real
workers. The autouse ``no_leftovers`` fixture (conftest) fails any test that
leaves a child process behind.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from typing import Any

import psutil
import pytest

import forkref
from forkref._refs.registry import registry
from helpers import pid_of, sigkill_self

pytestmark = pytest.mark.timeout(60)


def sqr(x: int, wait: float = 0.0) -> int:
    time.sleep(wait)
    return x * x


def mul(x: int, y: int) -> int:
    return x * y


def raising(x: int = 0) -> int:
    raise KeyError(f"key {x}")


def exit_now(code: int) -> None:
    os._exit(code)


def segfault(_: object = None) -> None:
    import faulthandler

    faulthandler.disable()  # pytest enables it: keep the expected crash quiet
    ctypes.string_at(0)


_initialized: list[Any] = []


def initializer(value: Any) -> None:
    _initialized.append(value)


def initialized(_: object = None) -> list[Any]:
    return list(_initialized)


def failing_initializer() -> None:
    raise RuntimeError("initializer says no")


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    """Pids still alive after waiting up to ``seconds`` (generous: not a timing claim)."""
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.02)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


METHODS = ["fork", "forkserver", "spawn"]


def fail_at_5(x: int) -> int:
    if x == 5:
        raise ZeroDivisionError(x)
    return x


def fail_mod_4(x: int) -> int:
    if x % 4 == 1:
        raise ZeroDivisionError(x)
    return x


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_pool(method: str) -> Any:
    """``forkref.Pool(...)`` under this test's start method."""
    return functools.partial(forkref.Pool, context=multiprocessing.get_context(method))


@pytest.fixture
def pool(make_pool: Any) -> Any:
    with make_pool(2) as p:
        yield p
        p.close()
        p.join()


# -- the stdlib's Pool behaviour (after Lib/test/_test_multiprocessing.py _TestPool) --------


def test_apply(pool: forkref.Pool) -> None:
    assert pool.apply(sqr, (5,)) == 25
    assert pool.apply(sqr, (), {"x": 3}) == 9


@pytest.mark.smoke
def test_map_and_starmap_keep_order(pool: forkref.Pool) -> None:
    assert pool.map(sqr, range(10)) == [x * x for x in range(10)]
    assert pool.map(sqr, list(range(100)), chunksize=20) == [x * x for x in range(100)]
    pairs = list(zip(range(10), range(9, -1, -1), strict=True))
    assert pool.starmap(mul, pairs) == [x * y for x, y in pairs]
    assert pool.starmap_async(mul, pairs, 3).get() == [x * y for x, y in pairs]
    assert pool.map(sqr, iter(range(7))) == [x * x for x in range(7)]  # not sized


def test_map_of_nothing(pool: forkref.Pool) -> None:
    assert pool.map(sqr, []) == []
    assert list(pool.imap(sqr, [])) == []


def test_async_results_and_callbacks(pool: forkref.Pool) -> None:
    got: list[Any] = []
    res = pool.apply_async(sqr, (7, 0.1), callback=got.append)
    assert res.get(timeout=30) == 49
    assert res.ready()
    assert res.successful()
    assert got == [49]
    mres = pool.map_async(sqr, range(10), callback=got.append)
    assert mres.get(timeout=30) == [x * x for x in range(10)]
    assert got[-1] == [x * x for x in range(10)]


def test_error_callback_and_exception_with_worker_traceback(pool: forkref.Pool) -> None:
    errors: list[BaseException] = []
    res = pool.apply_async(raising, (3,), error_callback=errors.append)
    with pytest.raises(KeyError, match="key 3") as info:
        res.get(timeout=30)
    assert not res.successful()
    assert errors
    assert isinstance(errors[0], KeyError)
    cause = info.value.__cause__
    assert cause is not None
    assert "in raising" in str(cause)  # the worker's traceback
    with pytest.raises(KeyError):
        pool.map(raising, range(4))


def test_successful_before_ready_raises(pool: forkref.Pool) -> None:
    res = pool.apply_async(sqr, (1, 2.0))
    with pytest.raises(ValueError, match="not ready"):
        res.successful()
    pool.terminate()


def test_timeouts(pool: forkref.Pool) -> None:
    res = pool.apply_async(sqr, (6, 5.0))
    with pytest.raises(multiprocessing.TimeoutError):
        res.get(timeout=0.01)
    it = pool.imap(sqr, [(1)], 1)
    assert it.next(timeout=30) == 1
    slow = pool.imap(functools.partial(sqr, wait=5.0), [2])
    with pytest.raises(multiprocessing.TimeoutError):
        slow.next(timeout=0.01)
    pool.terminate()  # the sleeping tasks are killed, not waited for


def test_imap_ordered_and_unordered(pool: forkref.Pool) -> None:
    assert list(pool.imap(sqr, range(50))) == [x * x for x in range(50)]
    assert list(pool.imap(sqr, range(50), chunksize=7)) == [x * x for x in range(50)]
    assert sorted(pool.imap_unordered(sqr, range(50), chunksize=3)) == [x * x for x in range(50)]
    it = pool.imap(sqr, range(3))
    assert [next(it), next(it), next(it)] == [0, 1, 4]
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(ValueError, match="Chunksize must be 1"):
        pool.imap(sqr, range(3), chunksize=0)


def test_imap_raises_at_the_failing_item(pool: forkref.Pool) -> None:
    it = pool.imap(fail_at_5, range(10))
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ZeroDivisionError):
        next(it)
    assert list(it) == [6, 7, 8, 9]  # as the stdlib: the iteration goes on (review finding 10)


def test_imap_unordered_goes_on_after_failing_items(pool: forkref.Pool) -> None:
    it = pool.imap_unordered(fail_mod_4, range(12))
    got, errors = [], 0
    while True:
        try:
            got.append(next(it))
        except ZeroDivisionError:
            errors += 1
        except StopIteration:
            break
    assert sorted(got) == [x for x in range(12) if x % 4 != 1]
    assert errors == 3


def test_imap_infinite_generator_is_consumed_lazily(pool: forkref.Pool) -> None:
    import itertools

    it = pool.imap(sqr, itertools.count())
    assert [next(it) for _ in range(20)] == [x * x for x in range(20)]
    pool.terminate()


def test_close_then_join_and_not_running(make_pool: Any) -> None:
    p = make_pool(2)
    assert p.map(sqr, range(4)) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="still running"):
        p.join()
    res = p.map_async(sqr, [(3)])
    p.close()
    p.close()  # idempotent
    p.join()
    assert res.get(timeout=1) == [9]  # submitted before close: completed
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply(sqr, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(sqr, [1])
    p.terminate()  # after join: harmless


def test_terminate_fails_pending_results_instead_of_hanging(make_pool: Any) -> None:
    p = make_pool(1)
    res = p.apply_async(sqr, (2, 10.0))
    queued = p.apply_async(sqr, (3,))
    p.terminate()
    p.terminate()
    p.join()
    with pytest.raises(forkref.Error, match="terminated"):
        res.get(timeout=5)
    with pytest.raises(forkref.Error, match="terminated"):
        queued.get(timeout=5)


def test_context_manager_terminates(make_pool: Any) -> None:
    with make_pool(2) as p:
        assert p.apply(sqr, (2,)) == 4
        pids = p._engine.pids()
    assert not wait_gone(pids)
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply(sqr, (1,))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        forkref.Pool(0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        forkref.Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="initializer"):
        forkref.Pool(1, initializer=3)  # type: ignore[arg-type]


def test_initializer_runs_in_every_worker(make_pool: Any) -> None:
    with make_pool(2, initializer=initializer, initargs=("hello",)) as p:
        assert all(v == ["hello"] for v in p.map(initialized, range(8), chunksize=1))


def test_failing_initializer_breaks_the_pool_instead_of_respawning_forever(
    make_pool: Any,
) -> None:
    with make_pool(2, initializer=failing_initializer) as p:
        with pytest.raises(forkref.BrokenPoolError, match="initializer says no"):
            p.apply(sqr, (1,))
        with pytest.raises(forkref.BrokenPoolError):
            p.apply(sqr, (1,))


def test_maxtasksperchild_replaces_workers(make_pool: Any) -> None:
    with make_pool(2, maxtasksperchild=1) as p:
        pids = p.map(pid_of, range(10), chunksize=1)
        assert len(set(pids)) == 10  # one task (chunk) per worker
        assert p.map(sqr, range(10)) == [x * x for x in range(10)]
        p.close()
        p.join()


def test_pool_size_and_worker_pids(pool: forkref.Pool) -> None:
    pids = set(pool.map(pid_of, range(40), chunksize=1))
    assert 1 <= len(pids) <= 2
    assert os.getpid() not in pids
    for _ in range(1000):  # the zygote reports pids asynchronously: wait for the state
        if pids <= set(pool._engine.pids()):
            break
        time.sleep(0.01)
    assert pids <= set(pool._engine.pids())


# -- worker deaths -------------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("kill", "args", "exitcode", "text"),
    [
        (sigkill_self, (), -signal.SIGKILL, "SIGKILL"),
        (exit_now, (3,), 3, "exit code 3"),
        (segfault, (), -signal.SIGSEGV, "SIGSEGV"),
    ],
)
def test_worker_death_fails_its_task_and_the_pool_goes_on(
    make_pool: Any, kill: Any, args: tuple[Any, ...], exitcode: int, text: str
) -> None:
    with make_pool(2) as p:
        p.map(sqr, range(4))
        with pytest.raises(forkref.WorkerDiedError, match=text) as info:
            p.apply(kill, args)
        assert info.value.exitcode == exitcode
        assert info.value.pid is not None
        assert not wait_gone([info.value.pid])
        assert isinstance(info.value, forkref.Error)
        assert p.map(sqr, range(10)) == [x * x for x in range(10)]  # replaced
        p.close()
        p.join()


def test_external_sigkill_of_a_busy_worker() -> None:
    with forkref.Pool(2) as p:
        p.apply(sqr, (1,))
        res = p.apply_async(pid_and_sleep, (30.0,))
        pid = _wait_for_busy_pid(p)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(forkref.WorkerDiedError, match=f"pid {pid} died .*SIGKILL"):
            res.get(timeout=30)
        assert p.apply(sqr, (3,)) == 9


def pid_and_sleep(seconds: float) -> int:
    with open(f"/tmp/forkref-busy-{os.getppid()}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def _wait_for_busy_pid(p: forkref.Pool) -> int:
    zygotes = p._engine.zygote_pids()
    for _ in range(3000):
        for z in zygotes:
            path = f"/tmp/forkref-busy-{z}"
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read()
                if text:
                    os.unlink(path)
                    return int(text)
        time.sleep(0.01)
    raise AssertionError("the task never started")


# -- what forkref adds ---------------------------------------------------------------------


@pytest.mark.smoke
def test_lambdas_closures_and_local_functions_work() -> None:
    offset = 10

    def local(x: int) -> int:
        return x + offset

    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

    with forkref.Pool(2) as p:
        assert p.map(lambda x: x * offset, range(3)) == [0, 10, 20]
        assert p.map(local, range(3)) == [10, 11, 12]
        assert p.apply(lambda: Local(4).v) == 4
        assert p.apply(functools.partial(mul, offset), (2,)) == 20


@pytest.mark.smoke
def test_late_objects_get_a_fresh_generation() -> None:
    early = forkref.share(bytearray(b"early"))
    with forkref.Pool(2) as p:
        assert p.apply(len, (early,)) == 5
        assert p._engine.generation == 1
        old = p._engine.pids()
        late = forkref.share(bytearray(b"late object"))
        assert p.apply(len, (late,)) == 11  # the stdlib fork Pool fails this
        assert p._engine.generation == 2
        assert p.apply(len, (early,)) == 5
        assert p._engine.generation == 2  # early objects need no new generation
        assert not wait_gone(old)  # the old generation exits
        p.close()
        p.join()
    early.release()
    late.release()


def test_foreign_thread_warns_once_in_forkrefs_words() -> None:
    from forkref._fork import threads

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="some-user-thread")
    t.start()
    saved = set(threads._warned_sites)
    threads._warned_sites.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with forkref.Pool(1) as p:
                p.apply(sqr, (1,))
                p.apply(lambda: 1)  # a second generation: no second warning
        ours = [w for w in caught if issubclass(w.category, forkref.ForkWarning)]
        assert len(ours) == 1
        assert "some-user-thread" in str(ours[0].message)
        assert ours[0].filename == __file__
        assert not [w for w in caught if "multi-threaded" in str(w.message)]
    finally:
        threads._warned_sites.update(saved)
        stop.set()
        t.join()


@pytest.mark.smoke
def test_no_multithreaded_fork_warning_from_forkrefs_own_threads() -> None:
    """Python >= 3.12 warns when fork() runs with several threads; forkref pauses its own.

    The warnings are recorded, not turned into errors: os.fork() swallows a
    warning that raises. forkref filters the warning only when other threads
    run (and then says so itself), so a dispatcher left running would show.
    """
    code = textwrap.dedent(
        """
        import warnings, forkref
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with forkref.Pool(2) as p, forkref.Pool(2) as q:
                assert p.apply(abs, (-1,)) == 1
                assert q.apply(abs, (-2,)) == 2  # p's dispatcher thread runs meanwhile
                big = forkref.share(bytearray(10))
                assert p.apply(len, (big,)) == 10  # late object: a second fork, threads running
                assert q.apply(len, (big,)) == 10  # and one of q
        forks = [str(w.message) for w in caught if "fork" in str(w.message)]
        assert not forks, forks
        print("ok")
        """
    )
    python = _python_at_least_312()
    if python is None:
        pytest.skip("needs a Python >= 3.12 with psutil (the warning is new in 3.12)")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _python_at_least_312() -> str | None:
    candidates = [sys.executable] if sys.version_info >= (3, 12) else []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates += [os.environ.get("FORKREF_TEST_PY312", "")]
    candidates += [os.path.join(here, v, "bin", "python") for v in (".venv-3.12", ".venv-3.13")]
    for python in candidates:
        if python and os.path.exists(python):
            probe = subprocess.run(
                [python, "-c", "import psutil"], capture_output=True, check=False
            )
            if probe.returncode == 0:
                return python
    return None


def test_collected_pool_leaves_no_process_and_thread_holds_no_strong_ref() -> None:
    p = forkref.Pool(2)
    p.map(sqr, range(4))
    while len(p._engine.pids()) < 2:  # the zygote reports pids asynchronously
        time.sleep(0.01)
    pids = p._engine.pids() + p._engine.zygote_pids()
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None
    assert not wait_gone(pids)


def test_no_orphans_when_the_parent_is_sigkilled_or_exits_without_closing() -> None:
    code = textwrap.dedent(
        """
        import os, sys, time, forkref
        p = forkref.Pool(2)
        p.map(abs, range(4))
        while len(p._engine.pids()) < 2:  # the zygote reports pids asynchronously
            time.sleep(0.01)
        print(" ".join(map(str, p._engine.pids() + p._engine.zygote_pids())), flush=True)
        if sys.argv[1] == "kill":
            time.sleep(60)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    for mode in ("kill", "exit"):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, mode], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 3
        if mode == "kill":
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        assert not wait_gone(pids), f"orphans after parent {mode}"


def test_registrations_are_released_when_the_pool_closes() -> None:
    before = len(registry())
    blob = b"x" * (2 * 2**20)
    with forkref.Pool(2) as p:
        assert p.map(len, [blob] * 4) == [len(blob)] * 4
        assert p.apply(lambda: 1) == 1
        assert len(registry()) > before
        p.close()
        p.join()
    assert len(registry()) == before


def test_unpicklable_argument_names_it() -> None:
    lock = threading.Lock()
    with forkref.Pool(1, share_threshold=None) as p:
        with pytest.raises(forkref.TaskPicklingError, match=r"argument 1 \(_thread.lock\)") as info:
            p.apply(mul, (1, lock))
        assert "forkref.share" in str(info.value)
        with pytest.raises(forkref.TaskPicklingError, match="keyword argument 'y'"):
            p.apply(mul, (1,), {"y": lock})
        with pytest.raises(forkref.TaskPicklingError, match="item 2 of the iterable"):
            p.map(sqr, [1, 2, lock])
        assert p.apply(sqr, (2,)) == 4  # the pool is fine


def test_unpicklable_result_is_an_error_not_a_hang(make_pool: Any) -> None:
    with make_pool(1) as p:
        with pytest.raises(forkref.TaskPicklingError, match="result"):
            p.apply(threading.Lock)
        assert p.apply(sqr, (2,)) == 4


def test_spawn_context_uses_stdlib_pickling_rules() -> None:
    ctx = multiprocessing.get_context("spawn")
    with forkref.Pool(1, context=ctx) as p:
        assert p.map(sqr, range(3)) == [0, 1, 4]
        with pytest.raises(forkref.TaskPicklingError, match="module level"):
            p.apply(lambda: 1)
        p.close()
        p.join()


def test_pool_memory_report() -> None:
    with forkref.Pool(2) as p:
        p.map(sqr, range(4))
        report = p.memory()
        roles = {m.role for m in report.processes}
        assert report.total_pss > 0
        assert {"parent", "worker", "fork server"} <= roles


def test_handles_dropped_right_after_submit_still_resolve() -> None:
    before = len(registry())
    with forkref.Pool(2) as p:
        p.apply(sqr, (1,))
        # Each handle is garbage right after apply_async() returns, and each is a
        # late object (a new generation): the pool pins the object until its task ran.
        results = [p.apply_async(len, (forkref.share(bytearray(n)),)) for n in range(1, 6)]
        assert [r.get(timeout=30) for r in results] == [1, 2, 3, 4, 5]
        p.close()
        p.join()
    assert len(registry()) == before  # pins released


_fork_threads: list[list[str]] = []
_watch_forks = False


def _record_threads_at_fork() -> None:
    if _watch_forks:
        _fork_threads.append([t.name for t in threading.enumerate()])


os.register_at_fork(before=_record_threads_at_fork)


def test_forkref_threads_are_paused_around_every_fork() -> None:
    """forkref's own threads never hold a lock across a fork: none runs at the fork."""
    global _watch_forks
    _fork_threads.clear()
    _watch_forks = True
    try:
        with forkref.Pool(2) as p, forkref.Pool(1) as q:
            p.apply(sqr, (1,))
            q.apply(sqr, (1,))  # p's dispatcher runs: it must be paused for q's fork
            late = forkref.share(bytearray(2))
            p.apply(len, (late,))  # a second generation of p while q's dispatcher runs
            assert p._engine.generation == 2
    finally:
        _watch_forks = False
    parent_forks = [names for names in _fork_threads if names]
    assert len(parent_forks) >= 3
    for names in parent_forks:
        assert "forkref-dispatcher" not in names, names


def test_imap_submitted_before_close_completes_after_join() -> None:
    p = forkref.Pool(2)
    it = p.imap(sqr, range(100))  # only a window of it is submitted so far
    p.close()  # submits the rest
    p.join()
    assert list(it) == [x * x for x in range(100)]


def nested_map(n: int) -> list[int]:
    with forkref.Pool(1) as inner:
        return inner.map(sqr, range(n))


def test_a_pool_inside_a_worker() -> None:
    with forkref.Pool(2) as p:
        assert p.map(nested_map, [2, 3]) == [[0, 1], [0, 1, 4]]


# -- review findings: hangs and lost results --------------------------------------------


@pytest.mark.filterwarnings("ignore::forkref.ForkWarning")  # the callback forks: main thread runs
def test_callbacks_that_submit_while_the_caller_forks_do_not_deadlock() -> None:
    """Review finding 1 (e7): the caller forks a generation per task (a fresh big
    object) while the dispatcher runs a callback that submits one too."""
    with forkref.Pool(2) as p:
        done: list[int] = []
        follow_ups: list[Any] = []

        def submit_more(_: int) -> None:
            follow_ups.append(p.apply_async(len, (os.urandom(2**21),), callback=done.append))

        firsts = [p.apply_async(len, (os.urandom(2**21),), callback=submit_more) for _ in range(12)]
        assert [r.get(timeout=30) for r in firsts] == [2**21] * 12
        assert [r.get(timeout=30) for r in follow_ups] == [2**21] * 12
        assert done == [2**21] * 12


def test_pool_with_pending_results_stays_alive_while_unreferenced() -> None:
    """Review finding 5 (e1): as the stdlib's, a pending result keeps its pool alive."""
    r = forkref.Pool(2).apply_async(sqr, (3, 0.2))
    m = forkref.Pool(2).map_async(sqr, range(4))
    gc.collect()
    assert r.get(timeout=30) == 9
    assert m.get(timeout=30) == [0, 1, 4, 9]
    assert r._pool is None  # the pools can go now
    assert m._pool is None


def test_plain_fork_child_exiting_leaves_the_parents_pool_alone() -> None:
    """Review finding 4 (e11): a fork() child runs the parent's exit handlers at its exit."""
    code = textwrap.dedent(
        """
        import os, sys, time, forkref
        def slow(x):
            time.sleep(x)
            return os.getpid()
        p = forkref.Pool(2)
        workers = set(p.map(slow, [0.1, 0.1]))
        pending = p.apply_async(slow, (0.5,))
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit: atexit handlers and finalizers run in the child
        os.waitpid(pid, 0)
        assert pending.get(30) in workers, "pending task"
        assert p.apply(slow, (0,)) in workers, "next task"
        p.close(); p.join()
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


class _Gate:
    """Pickles only once ``go`` is set (and says it started): holds a submit mid-pickling."""

    started = threading.Event()
    go = threading.Event()

    def __reduce__(self) -> Any:
        _Gate.started.set()
        assert _Gate.go.wait(30)
        return (int, ())


def _size_of(blob: object, _: object) -> str:
    return f"{type(blob).__name__} {len(blob) if isinstance(blob, bytes) else blob!r}"


def test_object_being_pickled_survives_a_generation_forked_by_another_thread() -> None:
    """Review finding 3 (e6): thread A's automatic share must not be released by
    thread B's fork between A's pickling and A's queueing."""
    _Gate.started.clear()
    _Gate.go.clear()
    with forkref.Pool(2) as p:
        p.apply(int)
        results: list[Any] = []
        t = threading.Thread(
            target=lambda: results.append(p.apply_async(_size_of, (os.urandom(2**21), _Gate())))
        )
        t.start()
        assert _Gate.started.wait(30)
        assert p.apply(len, (os.urandom(2**21),)) == 2**21  # a late object: a new generation
        _Gate.go.set()
        t.join(30)
        assert results[0].get(timeout=30) == f"bytes {2**21}"


def test_concurrent_submitters_of_late_objects() -> None:
    with forkref.Pool(2) as p:
        p.apply(int)
        out: list[int] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for i in range(6):
                value = p.apply(len, (os.urandom(2**20 + 64 * k + i),))
                with lock:
                    out.append(value)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(out) == sorted(2**20 + 64 * k + i for k in range(3) for i in range(6))


def _nap_pid(_: object) -> int:
    time.sleep(0.05)
    return os.getpid()


def test_quick_tasks_first_do_not_skew_the_queue_to_one_worker() -> None:
    """Review finding 8 (e15): one worker's speed estimate must not let it take the queue."""
    import collections

    with forkref.Pool(2) as p:
        for i in range(20):
            p.apply(abs, (i,))  # quick: that worker looks fast
        per_worker = collections.Counter(p.map(_nap_pid, range(16), chunksize=1))
        assert max(per_worker.values()) <= 12, per_worker  # a fair share is 8
