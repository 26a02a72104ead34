"""The bench's contenders: one small function per method and workload.

Every function gets a :class:`~forkref._tools.bench.registry.Run` and returns the
tasks' answers; the clock covers the whole function except ``run.untimed()``
blocks. As in ``benchmarks/bench_pools.py``, a pool's start, its map and its
end (``with pool:``, i.e. ``terminate()``) are timed for the one-shot
workloads; the tiny-task workload times the map alone on a started pool.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
from collections.abc import Callable, Iterator
from typing import Any

from forkref._tools.bench import tasks
from forkref._tools.bench.data import late_frame, trivial
from forkref._tools.bench.registry import Run, implements, method

__all__: list[str] = []

BIG = ("frame", "dicts")
_NO_OBJECT = "no object to share: the tasks' arguments are small"
_SAME_RESULTS = (
    "every forkref.Pool sends big results back through shared memory: see the forkref.Pool row"
)


# -- helpers -----------------------------------------------------------------------


def _fork_pool(run: Run) -> Any:
    return mp.get_context("fork").Pool(run.cfg.workers)


def _forkref_pool(run: Run, **options: Any) -> Any:
    from forkref._pools.pool import Pool

    return Pool(run.cfg.workers, **options)


def _spawn_pool(run: Run) -> Any:
    return _forkref_pool(run, context=mp.get_context("spawn"))


@contextlib.contextmanager
def _lifetime(run: Run, pool: Any) -> Iterator[Any]:
    """Use ``pool``, read the workers' memory (untimed), then leave it as ``with pool:`` does."""
    with pool:
        yield pool
        run.checkpoint()


@contextlib.contextmanager
def _started(run: Run, make: Callable[[], Any]) -> Iterator[Any]:
    """A pool made and warmed up off the clock, ended off the clock: only the map is timed."""
    with run.untimed():
        pool = make()
        pool.map(trivial, range(4 * run.cfg.workers))
    try:
        yield pool
    finally:
        with run.untimed():
            pool.terminate()


def _frames(run: Run) -> Iterator[Any]:
    """The late-object loop's new frames, each built off the clock."""
    for k in range(run.cfg.late_iters):
        with run.untimed():
            frame = late_frame(run.data, k)
        yield frame
        del frame


def _args(data: Any, run: Run) -> list[tuple[Any, int]]:
    return [(data, i) for i in range(run.tasks)]


def _map_each_frame(
    run: Run, pool: Any, passing: Callable[[Any], contextlib.AbstractContextManager[Any]]
) -> list[Any]:
    """The late workload on one long-lived pool: a map over each new frame.

    ``passing(frame)`` gives what the tasks get (the frame, a handle) for the
    map's duration; the frame goes before the next one is built.
    """
    answers = []
    for frame in _frames(run):
        with passing(frame) as passed:
            answers.append(pool.starmap(tasks.work_pid, _args(passed, run)))
        run.checkpoint()
        del frame, passed
    return answers


def _result_args(run: Run) -> list[tuple[int, int]]:
    return [(i, run.data) for i in range(run.tasks)]


def _import_all(answers: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    from forkref._shm.export import import_result

    return [(pid, import_result(token)) for pid, token in answers]


# -- the stdlib Pool, plain arguments (pickled for every task) ----------------------

method(
    "pickled",
    "stdlib Pool, pickled arg",
    per_task=True,
)


@implements("pickled", *BIG)
def _pickled_big(run: Run) -> Any:
    with _lifetime(run, _fork_pool(run)) as pool, run.scaling():
        return pool.starmap(tasks.work_pid, _args(run.data, run))


@implements("pickled", "late")
def _pickled_late(run: Run) -> Any:
    @contextlib.contextmanager
    def scaled(frame: Any) -> Iterator[Any]:
        with run.scaling():
            yield frame

    with _lifetime(run, _fork_pool(run)) as pool:
        return _map_each_frame(run, pool, scaled)


@implements("pickled", "result", label="stdlib Pool, pickled result")
def _pickled_result(run: Run) -> Any:
    with _lifetime(run, _fork_pool(run)) as pool:
        return pool.starmap(tasks.result, _result_args(run))


@implements("pickled", "tiny", label="stdlib Pool")
def _pickled_tiny(run: Run) -> Any:
    with _started(run, lambda: _fork_pool(run)) as pool:
        return pool.map(trivial, run.data)


# -- the global-variable trick ---------------------------------------------------

method(
    "global",
    "stdlib Pool + global",
    not_applicable={"result": "the data goes the other way", "tiny": _NO_OBJECT},
)


@implements("global", *BIG)
def _global_big(run: Run) -> Any:
    tasks.GLOBAL = run.data
    try:
        with _lifetime(run, _fork_pool(run)) as pool:
            return pool.starmap(tasks.global_work, _args(None, run))
    finally:
        tasks.GLOBAL = None


@implements("global", "late")
def _global_late(run: Run) -> Any:
    answers = []
    for frame in _frames(run):  # a fresh pool per new object: the trick's only way
        tasks.GLOBAL = frame
        with _lifetime(run, _fork_pool(run)) as pool:
            answers.append(pool.starmap(tasks.global_work, _args(None, run)))
        tasks.GLOBAL = None
        del frame
    return answers


# -- forkref.share() on the stdlib Pool ---------------------------------------------

method(
    "share-stdlib",
    "stdlib Pool + share()",
    not_applicable={"tiny": _NO_OBJECT},
)


@implements("share-stdlib", *BIG)
def _share_stdlib_big(run: Run) -> Any:
    from forkref._share.handle import share

    with share(run.data) as handle, _lifetime(run, _fork_pool(run)) as pool:
        return pool.starmap(tasks.work_pid, _args(handle, run))


@implements("share-stdlib", "late")
def _share_stdlib_late(run: Run) -> Any:
    from forkref._share.handle import share

    # One long-lived pool: each new frame reaches its workers through shared memory.
    with _lifetime(run, _fork_pool(run)) as pool:
        return _map_each_frame(run, pool, share)


@implements("share-stdlib", "result", label="stdlib Pool + export_result()")
def _share_stdlib_result(run: Run) -> Any:
    with _lifetime(run, _fork_pool(run)) as pool:
        return _import_all(pool.starmap(tasks.exported_result, _result_args(run)))


# -- forkref.Pool with a handle: the reference every ratio is taken against ----------


def _forkref_methods(
    name: str,
    label: str,
    make: Callable[[Run], Any],
    around: Callable[[Run], contextlib.AbstractContextManager[Any]] | None = None,
) -> None:
    """Register ``name``'s workloads: a ``forkref.Pool`` made by ``make``, fed handles.

    The forkref methods differ only in how the pool is made (fork, spawn, Ray);
    ``around`` wraps each run (for Ray: a local Ray started off the clock, as
    for Ray's own methods).
    """
    setting = around or (lambda run: contextlib.nullcontext())

    @implements(name, *BIG)
    def big(run: Run) -> Any:
        from forkref._share.handle import share

        with setting(run), share(run.data) as handle, _lifetime(run, make(run)) as pool:
            return pool.starmap(tasks.work_pid, _args(handle, run))

    @implements(name, "late")
    def late(run: Run) -> Any:
        from forkref._share.handle import share

        with setting(run), _lifetime(run, make(run)) as pool:
            return _map_each_frame(run, pool, share)

    # The stdlib's task, unchanged: the automatic route (result_threshold) is measured.
    @implements(name, "result", label=label)
    def result(run: Run) -> Any:
        with setting(run), _lifetime(run, make(run)) as pool:
            return pool.starmap(tasks.result, _result_args(run))

    @implements(name, "tiny", label=label)
    def tiny(run: Run) -> Any:
        with setting(run), _started(run, lambda: make(run)) as pool:
            return pool.map(trivial, run.data)


method("forkref", "forkref.Pool + share()")
_forkref_methods("forkref", "forkref.Pool", _forkref_pool)


# -- forkref.Pool(auto_share=True) with the plain object ----------------------------

method(
    "forkref-auto",
    "forkref.Pool(auto_share)",
    not_applicable={"result": _SAME_RESULTS, "tiny": _NO_OBJECT},
)


@implements("forkref-auto", *BIG)
def _auto_big(run: Run) -> Any:
    with _lifetime(run, _forkref_pool(run, auto_share=True)) as pool:
        return pool.starmap(tasks.work_pid, _args(run.data, run))


@implements("forkref-auto", "late")
def _auto_late(run: Run) -> Any:
    with _lifetime(run, _forkref_pool(run, auto_share=True)) as pool:
        return _map_each_frame(run, pool, contextlib.nullcontext)


# -- forkref.Pool over spawn: the shared-memory transport ---------------------------

method("forkref-spawn", "forkref.Pool(spawn) + share()")
_forkref_methods("forkref-spawn", "forkref.Pool(spawn)", _spawn_pool)


# -- joblib ---------------------------------------------------------------------------

method("joblib", "joblib (loky)", needs={"joblib": "pip install 'forkref[bench]'"})


def _parallel(run: Run, calls: Any) -> Any:
    from joblib import Parallel

    return Parallel(n_jobs=run.cfg.workers)(calls)


def _stop_loky(run: Run) -> None:
    """loky keeps its workers for the next call; the bench ends them off the clock."""
    from joblib.externals.loky import get_reusable_executor

    run.checkpoint()
    with run.untimed():
        get_reusable_executor().shutdown(wait=True)


@implements("joblib", *BIG)
def _joblib_big(run: Run) -> Any:
    from joblib import delayed

    try:
        return _parallel(run, (delayed(tasks.work_pid)(run.data, i) for i in range(run.tasks)))
    finally:
        _stop_loky(run)


@implements("joblib", "late")
def _joblib_late(run: Run) -> Any:
    from joblib import delayed

    answers = []
    try:
        for frame in _frames(run):
            calls = (delayed(tasks.work_pid)(frame, i) for i in range(run.tasks))
            answers.append(_parallel(run, calls))
            run.checkpoint()
            del frame, calls
    finally:
        _stop_loky(run)
    return answers


@implements("joblib", "result")
def _joblib_result(run: Run) -> Any:
    from joblib import delayed

    try:
        return _parallel(run, (delayed(tasks.result)(i, run.data) for i in range(run.tasks)))
    finally:
        _stop_loky(run)


@implements("joblib", "tiny")
def _joblib_tiny(run: Run) -> Any:
    from joblib import delayed

    try:
        with run.untimed():
            _parallel(run, (delayed(trivial)(x) for x in range(4 * run.cfg.workers)))
        return _parallel(run, (delayed(trivial)(x) for x in run.data))
    finally:
        _stop_loky(run)


# -- mpire ----------------------------------------------------------------------------

method("mpire", "mpire shared_objects", needs={"mpire": "pip install 'forkref[bench]'"})


def _mpire_pool(run: Run, shared: Any = None) -> Any:
    from mpire.pool import WorkerPool

    # keep_alive: the workers outlive map() until the pool ends, so checkpoint() sees them.
    return WorkerPool(
        n_jobs=run.cfg.workers, shared_objects=shared, start_method="fork", keep_alive=True
    )


@implements("mpire", *BIG)
def _mpire_big(run: Run) -> Any:
    with _mpire_pool(run, run.data) as pool:
        answers = pool.map(tasks.shared_work, [(i,) for i in range(run.tasks)])
        run.checkpoint()
    return answers


@implements("mpire", "late")
def _mpire_late(run: Run) -> Any:
    answers = []
    for frame in _frames(run):  # shared_objects are fixed at start: a pool per object
        with _mpire_pool(run, frame) as pool:
            answers.append(pool.map(tasks.shared_work, [(i,) for i in range(run.tasks)]))
            run.checkpoint()
        del frame
    return answers


@implements("mpire", "result", label="mpire")
def _mpire_result(run: Run) -> Any:
    with _mpire_pool(run) as pool:
        answers = pool.map(tasks.result, _result_args(run))
        run.checkpoint()
    return answers


@implements("mpire", "tiny", label="mpire")
def _mpire_tiny(run: Run) -> Any:
    with _started(run, lambda: _mpire_pool(run)) as pool:
        return pool.map(trivial, run.data)


# -- Ray ------------------------------------------------------------------------------

_RAY = {"ray": "pip install 'forkref[ray]'"}  # the extra pins the Ray version forkref needs
method(
    "ray-put",
    "ray.put + tasks",
    needs=_RAY,
    not_applicable={"tiny": "one Ray task per item is not how Ray is used; see the Ray Pool"},
)
method("ray-pool", "ray Pool", needs=_RAY, per_task=True)


@contextlib.contextmanager
def _ray(run: Run) -> Iterator[Any]:
    """A local Ray with one CPU per worker, started and stopped off the clock."""
    import ray

    with run.untimed():
        ray.init(
            num_cpus=run.cfg.workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,  # one ray.init per run: no banner each time
        )
    try:
        yield ray
    finally:
        with run.untimed():
            ray.shutdown()


@implements("ray-put", *BIG)
def _ray_put_big(run: Run) -> Any:
    with _ray(run) as ray:
        remote = ray.remote(tasks.work_pid)
        ref = ray.put(run.data)
        answers = ray.get([remote.remote(ref, i) for i in range(run.tasks)])
        run.checkpoint()
        return answers


@implements("ray-put", "late")
def _ray_put_late(run: Run) -> Any:
    answers = []
    with _ray(run) as ray:
        remote = ray.remote(tasks.work_pid)
        for frame in _frames(run):
            ref = ray.put(frame)
            answers.append(ray.get([remote.remote(ref, i) for i in range(run.tasks)]))
            run.checkpoint()
            del frame, ref
    return answers


@implements("ray-put", "result")
def _ray_put_result(run: Run) -> Any:
    with _ray(run) as ray:
        remote = ray.remote(tasks.result)
        answers = ray.get([remote.remote(i, run.data) for i in range(run.tasks)])
        run.checkpoint()
        return answers


def _ray_pool(run: Run) -> Any:
    from ray.util.multiprocessing import Pool

    return Pool(processes=run.cfg.workers)


@implements("ray-pool", *BIG)
def _ray_pool_big(run: Run) -> Any:
    with _ray(run), _lifetime(run, _ray_pool(run)) as pool, run.scaling():
        return pool.starmap(tasks.work_pid, _args(run.data, run))


@implements("ray-pool", "late")
def _ray_pool_late(run: Run) -> Any:
    answers = []
    with _ray(run), _lifetime(run, _ray_pool(run)) as pool:
        for frame in _frames(run):
            with run.scaling():
                answers.append(pool.starmap(tasks.work_pid, _args(frame, run)))
            run.checkpoint()
            del frame
    return answers


@implements("ray-pool", "result")
def _ray_pool_result(run: Run) -> Any:
    with _ray(run), _lifetime(run, _ray_pool(run)) as pool:
        return pool.starmap(tasks.result, _result_args(run))


@implements("ray-pool", "tiny")
def _ray_pool_tiny(run: Run) -> Any:
    with _ray(run), _started(run, lambda: _ray_pool(run)) as pool:
        return pool.map(trivial, run.data)


# -- forkref's own Ray backend ------------------------------------------------------


method("forkref-ray", "forkref.Pool(backend=ray)", needs=_RAY)

_forkref_methods(
    "forkref-ray",
    "forkref.Pool(backend=ray)",
    lambda run: _forkref_pool(run, backend="ray"),
    around=_ray,
)
