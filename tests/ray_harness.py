"""A real Ray for the tests: private to this pytest process, loopback only, never left behind.

Import this module before Ray (the test modules do, first thing): Ray reads
some settings from the environment when it is imported.

* **Private.** Ray's files (sockets, logs, the address file that a bare
  ``ray.init()`` would read to join "the" cluster of this machine) live in a
  directory of this session (``RAY_TMPDIR``); instances are started with
  ``address="local"`` and random ports, without the dashboard; so a second
  copy of the suite running at the same time never meets this one's Ray.
* **Loopback only.** ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray bind its
  servers to 127.0.0.1 instead of the machine's address.
* **Not killed for others' memory.** Ray's memory monitor (which kills workers
  when the whole machine is above 95% memory) is off.
* **Never left behind.** Ray's processes are children of this process
  (gcs_server, raylet and the agents; workers are the raylet's children). The
  fixtures shut Ray down and then kill whatever of those trees is left, also
  when the test failed or timed out (pytest-timeout raises in the test, so the
  fixtures' teardown runs). :func:`no_leftovers` replaces the suite's fixture of
  the same name in the Ray test modules: it does the same checks, but spares
  the processes of a Ray instance that a module-scoped fixture keeps up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray 2.60 otherwise writes an auth token into ~/.ray: nothing shared outside this session.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray's memory monitor kills workers when the *machine* is above 95% memory; on a
# machine shared with other test runs that is their memory, not ours: off.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

OBJECT_STORE = 256 * 2**20
#: Direct children of this process that belong to a Ray instance kept up across tests.
KEPT: set[int] = set()


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def _tree(pids: set[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
    return procs


def kill_trees(pids: set[int], grace: float = 5.0) -> list[psutil.Process]:
    """Wait up to ``grace`` seconds for these processes (and descendants) to end; kill the rest.

    Returns the processes that had to be killed.
    """
    procs = _tree(pids)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)
    return alive


@contextlib.contextmanager
def ray_environment() -> Iterator[str]:
    """The environment a Ray instance started in the block inherits; yields its directory.

    ``RAY_TMPDIR`` is a fresh short directory (unix socket paths are limited
    in length). ``PYTHONPATH`` gains this directory: Ray adds only the
    driver's script directory and working directory to its workers'
    ``sys.path``, and the workers must import the test modules to unpickle
    the functions defined there.
    """
    path = tempfile.mkdtemp(prefix="frray-", dir="/tmp")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    pythonpath = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    old = {name: os.environ.get(name) for name in ("RAY_TMPDIR", "PYTHONPATH")}
    os.environ.update(RAY_TMPDIR=path, PYTHONPATH=pythonpath)
    try:
        yield path
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def started(start: Callable[[], Any], stop: Callable[[], None]) -> Iterator[Any]:
    """Run ``start()``, yield its value, then ``stop()`` and kill every process it left.

    The processes are the children of this process that appeared during
    ``start()``, with all their descendants.
    """
    before = _children()
    try:
        value = start()
    except BaseException:
        kill_trees(_children() - before, grace=0)
        raise
    ours = _children() - before
    try:
        yield value, ours
    finally:
        try:
            stop()
        finally:
            kill_trees(ours | (_children() - before))


@contextlib.contextmanager
def private_ray() -> Iterator[str]:
    """For a test whose pools start forkref's own private Ray: nothing of it outlives the block.

    The block runs in :func:`ray_environment`; on the way out, also after a
    failure or a timeout (pools the test left open are its own to close,
    in a ``with`` or an ``ExitStack`` inside this block), Ray is shut down if
    it is still up and every process that appeared meanwhile is killed.
    """
    import ray

    before = _children()
    with ray_environment() as path:
        try:
            yield path
        finally:
            if ray.is_initialized():
                ray.shutdown()
            kill_trees(_children() - before)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, **options: Any) -> Iterator[Any]:
    """A private local Ray instance (``ray.init(address="local")``) for the block."""
    import ray

    def start() -> Any:
        return ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=OBJECT_STORE,
            **options,
        )

    with ray_environment(), started(start, ray.shutdown) as (context, ours):
        KEPT.update(ours)
        try:
            yield context
        finally:
            KEPT.difference_update(ours)


@contextlib.contextmanager
def two_node_cluster(connect: bool = True) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` of two nodes on this machine (this process connected).

    The head has resource ``{"head": 1}``, the second node ``{"second": 1}``;
    one CPU each.
    """
    import ray
    from ray.cluster_utils import Cluster

    def start() -> Any:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "resources": {"head": 1},
                "include_dashboard": False,
                "object_store_memory": OBJECT_STORE // 2,
            },
        )
        cluster.add_node(num_cpus=1, resources={"second": 1}, object_store_memory=OBJECT_STORE // 2)
        cluster.wait_for_nodes()
        if connect:
            ray.init(address=cluster.address, log_to_driver=False)
        return cluster

    holder: list[Any] = []

    def stop() -> None:
        if connect:
            ray.shutdown()
        if holder:
            holder[0].shutdown()

    with ray_environment(), started(start, stop) as (cluster, _):
        holder.append(cluster)
        yield cluster


def ray_processes_alive() -> list[str]:
    """Descriptions of this process's descendants that are Ray processes (for assertions)."""
    names = ("raylet", "gcs_server", "ray::", "default_worker", "ray_process_reaper", "dashboard")
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            text = " ".join(proc.cmdline()) or proc.name()
            if any(n in text for n in names) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {text[:80]}")
    return found


def _kept(proc: psutil.Process) -> bool:
    """Whether ``proc`` belongs to a kept Ray instance: it or an ancestor is a kept child.

    By ancestry, not by a list made beforehand: the raylet starts new idle
    workers at any moment (after an actor ends, for instance).
    """
    try:
        return proc.pid in KEPT or any(p.pid in KEPT for p in proc.parents())
    except psutil.NoSuchProcess:
        return True  # gone already


def _stray() -> list[psutil.Process]:
    stray = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if _kept(child) or child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(n in " ".join(child.cmdline()) for n in ("forkserver", "resource_tracker")):
                continue
            stray.append(child)
    return stray


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """The suite's check, sparing a module's kept Ray instance: no stray child process."""
    yield
    stray = _stray()
    if stray:
        _, alive = psutil.wait_procs(stray, timeout=5.0)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        assert not alive, f"test left child processes running: {alive}"


class ChannelDriver:
    """Drives Ray channel objects the way the pool engine's dispatcher does.

    Used to test the Ray launcher and the actor side on their own. Tasks are
    pickled by the Ray encoder, sent, and their replies decoded into
    ``(ok, value)`` in task order; tasks the channel never answered (left to
    the engine, which would send them elsewhere) come back as ``(None, "unsent")``.
    """

    def __init__(self, launcher: Any, share_threshold: int | None = 2**20) -> None:
        from forkref._engine.model import Generation
        from forkref._share.autoshare import AutoSharer

        self.launcher = launcher
        self.sharer = AutoSharer(share_threshold, auto_share=True, by_reference=True)
        self.encoder = launcher.encoder(self.sharer)
        self.gen = Generation(1, 0)
        launcher.start_generation(self.gen)
        self._ids = iter(range(1, 1 << 62))
        self._wids = iter(range(1, 1 << 62))

    def launch(self) -> Any:
        return self.launcher.launch(self.gen, next(self._wids))

    def encode(self, kind: int, fn: Any, datas: list[Any]) -> list[Any]:
        from forkref._engine.model import Task

        fn_blob = self.encoder.encode_function(fn)
        tasks = []
        with self.encoder.batch() as batch:
            for data in datas:
                before = len(batch.refs)
                encoded = batch.encode(kind, fn, data)
                task = Task(
                    next(self._ids),
                    kind,
                    fn_blob,
                    encoded,
                    data=data,
                    offset=0,
                    on_done=lambda ok, value: None,
                    on_start=None,
                )
                task.refs = batch.refs[before:] + fn_blob.refs
                tasks.append(task)
        return tasks

    def run(self, channel: Any, kind: int, fn: Any, datas: list[Any]) -> list[tuple[Any, Any]]:
        tasks = self.encode(kind, fn, datas)
        for task in tasks:
            channel.send(task)
        return self.collect(channel, tasks)

    @staticmethod
    def collect(channel: Any, tasks: list[Any]) -> list[tuple[Any, Any]]:
        import pickle
        import select

        from forkref._engine.wire import HDR, OK, READY

        got: dict[int, tuple[Any, Any]] = {}
        while len(got) < len(tasks):
            select.select([channel.fd], [], [])
            try:
                replies = channel.read()
            except EOFError:
                break
            for reply in replies:
                task_id, op = HDR.unpack_from(reply)
                if op == READY:
                    continue
                value = pickle.loads(reply[HDR.size :])
                if op != OK:
                    exc, tb = value
                    exc.__cause__ = RuntimeError(tb)
                    value = exc
                got[task_id] = (op == OK, value)
        return [got.get(t.id, (None, "unsent")) for t in tasks]
