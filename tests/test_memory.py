"""memory_report() and MemorySampler against processes whose memory is known."""

from __future__ import annotations

import dataclasses
import gc
import mmap
import multiprocessing as mp
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import psutil
import pytest

import forkref
from forkref import MemoryAccessError, MemoryReport, MemoryReportError, MemorySampler

MiB = 2**20
N = 64 * MiB
PAGE = os.sysconf("SC_PAGE_SIZE")


def _touch(buffer: bytearray, value: int) -> None:
    """Write one byte per page: every page of the buffer becomes this process's own."""
    for offset in range(0, len(buffer), PAGE):
        buffer[offset] = value


def allocator(conn: Connection) -> None:
    """A worker driven step by step: 'alloc' N touched bytes, 'free' them, 'exit'."""
    # An anonymous mapping, not malloc: whether free() hands memory back to the
    # OS depends on malloc's thresholds, which libraries loaded earlier (the whole
    # suite imports pandas and pyarrow) may have moved; munmap always does.
    held: list[mmap.mmap] = []
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "alloc":
            block = mmap.mmap(-1, N)
            for offset in range(0, N, PAGE):  # one write per page: N private bytes
                block[offset] = 1
            held.append(block)
        elif command == "free":
            for block in held:
                block.close()
            held.clear()
        else:
            return
        conn.send(command)


@pytest.fixture
def worker() -> Iterator[tuple[int, Callable[[str], None]]]:
    """A forked process that allocates and frees N MiB on command."""
    parent_end, child_end = mp.Pipe()
    process = mp.get_context("fork").Process(target=allocator, args=(child_end,))
    process.start()
    assert parent_end.poll(30)
    assert parent_end.recv() == "ready"

    def command(what: str) -> None:
        parent_end.send(what)
        assert parent_end.poll(30)
        assert parent_end.recv() == what

    yield process.pid or 0, command
    parent_end.send("exit")
    process.join(30)
    assert process.exitcode == 0


@pytest.mark.smoke
@pytest.mark.timeout(60)
def test_uss_rss_and_pss_grow_by_what_a_worker_allocates(
    worker: tuple[int, Callable[[str], None]],
) -> None:
    pid, command = worker
    before = forkref.memory_report([pid]).by_pid(pid)
    command("alloc")
    after = forkref.memory_report([pid]).by_pid(pid)
    for name in ("uss", "pss", "rss"):
        grown = getattr(after, name) - getattr(before, name)
        assert 0.9 * N < grown < 1.3 * N, (name, grown / MiB)
    command("free")
    freed = forkref.memory_report([pid]).by_pid(pid)
    assert freed.uss < after.uss - 0.9 * N


@pytest.mark.timeout(60)
def test_inherited_pages_are_shared_until_the_worker_writes_them() -> None:
    """RSS counts the parent's buffer in the worker; USS only once the worker writes it."""
    buffer = bytearray(N)
    _touch(buffer, 1)
    parent_end, child_end = mp.Pipe()

    def child() -> None:
        child_end.send("forked")
        child_end.recv()
        _touch(buffer, 2)  # copy-on-write: each page is copied into the child
        child_end.send("written")
        child_end.recv()

    process = mp.get_context("fork").Process(target=child)
    process.start()
    try:
        assert parent_end.poll(30)
        assert parent_end.recv() == "forked"
        shared = forkref.memory_report({process.pid: "worker"}).by_pid(process.pid or 0)
        assert shared.role == "worker"
        assert shared.shared > N  # the buffer (and more of the parent) is resident, shared
        assert shared.uss < N / 2
        assert shared.pss - shared.uss > 0.4 * N  # half of the buffer, counted proportionally
        parent_end.send("write")
        assert parent_end.poll(30)
        assert parent_end.recv() == "written"
        copied = forkref.memory_report([process.pid or 0]).by_pid(process.pid or 0)
        assert copied.uss - shared.uss > 0.9 * N
    finally:
        parent_end.send("exit")
        process.join(30)


def test_report_records_are_immutable_documented_and_picklable() -> None:
    me = os.getpid()
    report = forkref.memory_report([me, me])  # duplicates are read once
    assert [p.pid for p in report.processes] == [me]
    record = report.by_pid(me)
    assert record.role == "parent"
    assert record.rss >= record.pss >= record.uss > 0
    assert record.shared == record.rss - record.uss
    assert report.total_uss == record.uss
    assert report.total_pss == record.pss
    assert report.total_rss == record.rss
    assert report.total_swap == record.swap
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.uss = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.total_uss = 0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(report)) == report
    assert str(me) in report.table()
    assert "parent" in report.table()
    for cls in (forkref.ProcessMemory, MemoryReport):
        for name in ("rss", "uss", "pss") if cls is forkref.ProcessMemory else ("total_pss",):
            assert name in (cls.__doc__ or "")
    with pytest.raises(KeyError):
        report.by_pid(me + 10**7)


def test_roles_come_from_a_mapping_or_the_roles_argument(
    worker: tuple[int, Callable[[str], None]],
) -> None:
    pid, _ = worker
    me = os.getpid()
    assert [p.role for p in forkref.memory_report([me, pid]).processes] == ["parent", "worker"]
    report = forkref.memory_report({me: "driver", pid: "loader"})
    assert [p.role for p in report.processes] == ["driver", "loader"]
    report = forkref.memory_report([pid], roles={pid: "w0"})
    assert report.by_role("w0") == report.processes
    assert report.total_uss == sum(p.uss for p in report.processes)


def test_a_process_that_exited_is_listed_as_missing() -> None:
    process = mp.get_context("fork").Process(target=os.getpid)
    process.start()
    process.join(30)
    gone = process.pid or 0
    report = forkref.memory_report([os.getpid(), gone])
    assert report.missing == (gone,)
    assert [p.pid for p in report.processes] == [os.getpid()]
    assert "exited" in report.table()


@pytest.mark.timeout(60)
def test_a_zombie_does_not_crash_the_report() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:  # bounded by the timeout
            time.sleep(0.01)
        report = forkref.memory_report([pid])
        assert report.missing == (pid,)
        assert report.processes == ()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.parametrize("bad", ["1", -1, True, 1.5, None])
def test_bad_pids_are_a_clear_error(bad: Any) -> None:
    with pytest.raises(MemoryReportError, match="is not a process id"):
        forkref.memory_report([bad])


def test_a_non_iterable_is_a_clear_error() -> None:
    with pytest.raises(MemoryReportError, match="iterable of ints or a mapping"):
        forkref.memory_report(42)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_is_a_forkref_error() -> None:
    """An unprivileged process may not read root's memory maps: MemoryAccessError, not a crash."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        outcome = b"?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            forkref.memory_report([parent])
            outcome = b"no error"
        except MemoryAccessError as exc:
            ok = str(parent) in str(exc) and "run as the user" in str(exc)
            outcome = b"ok" if ok else str(exc).encode()
        except BaseException as exc:
            outcome = repr(exc).encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    try:
        outcome = os.read(read_end, 4096)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert outcome == b"ok"
    assert issubclass(MemoryAccessError, forkref.Error)


# --- MemorySampler --------------------------------------------------------------


def _wait_for_samples(sampler: MemorySampler, count: int) -> None:
    target = sampler.samples + count
    while sampler.samples < target:  # bounded by the test's timeout mark
        assert sampler.running
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_sampler_keeps_the_peak_of_a_worker_that_allocated_and_freed(
    worker: tuple[int, Callable[[str], None]],
) -> None:
    pid, command = worker
    with MemorySampler([pid], interval=0.02) as sampler:
        _wait_for_samples(sampler, 2)
        baseline = sampler.last.by_pid(pid).uss if sampler.last else 0
        command("alloc")
        _wait_for_samples(sampler, 3)
        command("free")
    assert not sampler.running
    peak = sampler.peaks().by_pid(pid)
    assert peak.uss - baseline > 0.9 * N
    assert sampler.last is not None
    assert sampler.last.by_pid(pid).uss < peak.uss - 0.9 * N
    assert sampler.peak_total_uss >= peak.uss
    assert sampler.peak_total_pss >= peak.pss - 1  # one process: its peak is the total's


@pytest.mark.timeout(60)
def test_sampler_follows_a_changing_set_of_pids(
    worker: tuple[int, Callable[[str], None]],
) -> None:
    pid, _ = worker
    # Forked before the sampler's thread starts: a fork beside it would be the
    # multi-threaded fork Python 3.12+ warns about.
    gone = mp.get_context("fork").Process(target=os.getpid)
    gone.start()
    gone.join(30)
    current: dict[int, str] = {os.getpid(): "parent"}
    with MemorySampler(lambda: dict(current), interval=0.02) as sampler:
        _wait_for_samples(sampler, 1)
        current[pid] = "worker"
        _wait_for_samples(sampler, 2)
        current[gone.pid or 0] = "worker"  # a pid that is gone
        _wait_for_samples(sampler, 2)
    peaks = sampler.peaks()
    assert {p.pid for p in peaks.processes} == {os.getpid(), pid}
    assert peaks.by_pid(pid).role == "worker"
    assert peaks.missing == (gone.pid,)


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "forkref-memory-sampler"]


@pytest.mark.timeout(60)
def test_sampler_thread_stops_cleanly_and_stop_is_idempotent() -> None:
    sampler = MemorySampler([os.getpid()], interval=0.01)
    sampler.start()
    sampler.start()  # no second thread
    assert len(_sampler_threads()) == 1
    sampler.stop()
    sampler.stop()
    assert not _sampler_threads()
    assert sampler.samples >= 2
    with pytest.raises(MemoryReportError, match="create a new MemorySampler"):
        sampler.start()


@pytest.mark.timeout(60)
def test_a_dropped_sampler_does_not_leak_its_thread() -> None:
    sampler = MemorySampler([os.getpid()], interval=0.01).start()
    thread = _sampler_threads()[0]
    del sampler
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_a_failing_pid_source_surfaces_as_a_forkref_error_on_stop() -> None:
    calls = []

    def source() -> list[int]:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("pool gone")
        return [os.getpid()]

    sampler = MemorySampler(source, interval=0.01).start()
    while sampler.running:  # the thread ends on the error
        time.sleep(0.01)
    with pytest.raises(MemoryReportError, match="sampling failed") as info:
        sampler.stop()
    assert isinstance(info.value.__cause__, RuntimeError)
    sampler.stop()  # idempotent after the error too


@pytest.mark.timeout(60)
def test_a_sampler_error_does_not_mask_the_exception_leaving_the_block() -> None:
    sources = iter([[os.getpid()], ["not a pid"]])
    with pytest.raises(ZeroDivisionError), MemorySampler(lambda: next(sources), interval=0.01):
        1 / 0


def test_sampler_rejects_a_bad_interval() -> None:
    with pytest.raises(MemoryReportError, match="positive number of seconds"):
        MemorySampler([os.getpid()], interval=0)
