"""Memory reports: how much memory a parent and its forked workers really use.

After ``fork()`` a parent and its workers share every page until one of them
writes to it. The figure people usually look at, RSS, counts each shared page
in full in every process that maps it, so summing RSS over a parent and eight
workers counts the shared data nine times. The figures that answer "how much
does this cost" are:

* USS (unique set size): pages that only this process maps. It is what the
  process would give back if it exited, and where copy-on-write copies show
  up: a worker's USS is what it did not manage to share.
* PSS (proportional set size): USS plus each shared page divided by the number
  of processes sharing it. PSS adds up across processes to the real total.

All figures come from psutil (``Process.memory_full_info()``, which reads
``/proc/<pid>/smaps_rollup`` on Linux), except the segment split: the pages of
forkref's shared-memory segments, which a spawn worker reading a shared array
zero-copy maps from the tmpfs, are counted from ``/proc/<pid>/smaps`` apart
from the process's own memory (``segment_*`` fields, ``own_uss``), so a
worker that touched a segment first does not look like it copied it.

Non-goals: this is not a profiler (it says how much, not which objects), and
it does not attribute shared pages to the object that owns them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeAlias

import psutil

from forkref._errors import MemoryAccessError, MemoryReportError
from forkref._fork.atfork import pause_at_every_fork
from forkref._fork.safe import register_pausable
from forkref._os import wait_os_thread_gone
from forkref._shm.segments import segment_dir

__all__ = ["MemoryReport", "MemorySampler", "ProcessMemory", "memory_report"]

_MiB = 2**20

#: What :func:`memory_report` accepts: pids, or a mapping of pid to role.
Pids: TypeAlias = Iterable[int] | Mapping[int, str]


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MiB:,.1f} MiB"


@dataclass(frozen=True, repr=False)
class ProcessMemory:
    """One process's memory, in bytes, at one moment.

    Attributes:
        pid: the process id.
        role: what the process is to the caller: ``"parent"``, ``"worker"``, or
            any label the caller gave.
        rss: resident set size: all of the process's pages in RAM, including
            pages it shares with other processes, each counted in full. Summed
            over a parent and its forked workers it counts shared pages once
            per process, so it over-counts; prefer ``uss`` and ``pss``.
        uss: unique set size: pages mapped by this process only. What exiting
            would free. For a forked worker, the parent's pages it copied by
            writing to them (reference counts included) show up here.
        pss: proportional set size: ``uss`` plus every shared page divided by
            the number of processes that share it. Sums across processes to
            the true total.
        shared: resident pages this process shares with at least one other
            process: ``rss - uss``. For a forked worker, mostly the parent's
            pages it has only read. (Not psutil's ``shared``, which counts only
            file-backed and shared-memory pages.)
        swap: bytes of this process swapped out to disk.
        segment_rss: the part of ``rss`` that is forkref's shared-memory
            segments (files of the segment directory, ``FORKREF_SHM_DIR`` or
            ``/dev/shm``, mapped by a spawn/forkserver worker reading a shared
            object zero-copy, or by the parent exporting it). These pages live
            in the tmpfs, not in the process's heap.
        segment_pss: the part of ``pss`` that is segment pages.
        segment_uss: the part of ``uss`` that is segment pages: pages of a
            segment that only this process has touched so far. They count as
            private, but they are the shared object's, and another reader
            would share them.
    """

    __module__ = "forkref"

    pid: int
    role: str
    rss: int
    uss: int
    pss: int
    shared: int
    swap: int
    segment_rss: int = 0
    segment_pss: int = 0
    segment_uss: int = 0

    @property
    def own_uss(self) -> int:
        """``uss`` less the segment pages: the process's own private memory (heap, copies)."""
        return max(self.uss - self.segment_uss, 0)

    @property
    def own_pss(self) -> int:
        """``pss`` less the segment pages' share."""
        return max(self.pss - self.segment_pss, 0)

    def peak_with(self, other: ProcessMemory) -> ProcessMemory:
        """Field-by-field maximum of two samples of the same process."""
        return ProcessMemory(
            pid=self.pid,
            role=self.role,
            rss=max(self.rss, other.rss),
            uss=max(self.uss, other.uss),
            pss=max(self.pss, other.pss),
            shared=max(self.shared, other.shared),
            swap=max(self.swap, other.swap),
            segment_rss=max(self.segment_rss, other.segment_rss),
            segment_pss=max(self.segment_pss, other.segment_pss),
            segment_uss=max(self.segment_uss, other.segment_uss),
        )

    def __repr__(self) -> str:
        return (
            f"<forkref.ProcessMemory pid {self.pid} ({self.role}): uss {_mib(self.uss)}, "
            f"pss {_mib(self.pss)}, rss {_mib(self.rss)}, shared {_mib(self.shared)}, "
            f"swap {_mib(self.swap)}, segments {_mib(self.segment_rss)} "
            f"(own uss {_mib(self.own_uss)})>"
        )


@dataclass(frozen=True, repr=False)
class MemoryReport:
    """Memory of a set of processes (typically a parent and its workers), in bytes.

    Attributes:
        processes: one :class:`ProcessMemory` per process that could be read,
            in the order the pids were given.
        missing: pids that had exited (or were zombies) when they were read:
            a worker may end between being listed and being sampled.
        total_rss: sum of ``rss``. Over-counts: a page shared by N processes
            is counted N times. Shown for comparison only.
        total_uss: sum of ``uss``: memory private to these processes.
        total_pss: sum of ``pss``: the real memory cost of these processes
            together, shared pages counted once (split among their sharers;
            pages shared with processes outside the report are only partly
            counted).
        total_swap: sum of ``swap``.
    """

    __module__ = "forkref"

    processes: tuple[ProcessMemory, ...]
    missing: tuple[int, ...] = ()
    total_rss: int = field(init=False)
    total_uss: int = field(init=False)
    total_pss: int = field(init=False)
    total_swap: int = field(init=False)

    def __post_init__(self) -> None:
        # Frozen: totals are derived once here, so they can never disagree with `processes`.
        for name in ("rss", "uss", "pss", "swap"):
            total = sum(getattr(process, name) for process in self.processes)
            object.__setattr__(self, f"total_{name}", total)

    def by_pid(self, pid: int) -> ProcessMemory:
        """The record of ``pid``; ``KeyError`` if it is not in the report."""
        for process in self.processes:
            if process.pid == pid:
                return process
        raise KeyError(pid)

    def by_role(self, role: str) -> tuple[ProcessMemory, ...]:
        """The records whose role is ``role``, e.g. every ``"worker"``."""
        return tuple(process for process in self.processes if process.role == role)

    def __str__(self) -> str:
        """The table: ``print(pool.memory())`` shows one line per process."""
        return self.table()

    def __repr__(self) -> str:
        processes = len(self.processes)
        return (
            f"<forkref.{type(self).__name__} of {processes} process"
            f"{'' if processes == 1 else 'es'}: total uss {_mib(self.total_uss)}, "
            f"pss {_mib(self.total_pss)}, rss {_mib(self.total_rss)}"
            f"{self._repr_extra()}; print() it for the table>"
        )

    def _repr_extra(self) -> str:
        return f", {len(self.missing)} exited" if self.missing else ""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython and Jupyter show the table for a report left at the end of a cell.
        printer.text(repr(self) if cycle else self.table())

    def table(self) -> str:
        """The report as a fixed-width text table in MiB, one line per process.

        ``segments`` is the resident part of forkref's shared-memory segments
        (:attr:`ProcessMemory.segment_rss`), ``own uss`` the private memory
        that is not segment pages (:attr:`ProcessMemory.own_uss`).
        """
        width = max([10, *(len(p.role) for p in self.processes)])
        lines = [
            f"{'pid':>8} {'role':<{width}} {'rss':>9} {'uss':>9} {'pss':>9} {'shared':>9} "
            f"{'segments':>9} {'own_uss':>9}"
        ]
        for p in self.processes:
            lines.append(
                f"{p.pid:>8} {p.role:<{width}} {p.rss / _MiB:>9.1f} {p.uss / _MiB:>9.1f} "
                f"{p.pss / _MiB:>9.1f} {p.shared / _MiB:>9.1f} {p.segment_rss / _MiB:>9.1f} "
                f"{p.own_uss / _MiB:>9.1f}"
            )
        own = sum(p.own_uss for p in self.processes)
        lines.append(
            f"{'total':>8} {'':<{width}} {self.total_rss / _MiB:>9.1f} "
            f"{self.total_uss / _MiB:>9.1f} {self.total_pss / _MiB:>9.1f} {'':>9} {'':>9} "
            f"{own / _MiB:>9.1f}   (MiB; total rss over-counts shared pages)"
        )
        if self.missing:
            lines.append(f"exited before they could be read: {list(self.missing)}")
        return "\n".join(lines)


def _checked_pid(pid: object) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise MemoryReportError(
            f"memory_report: {pid!r} is not a process id; pass non-negative ints "
            "(e.g. [p.pid for p in processes])"
        )
    return pid


def _roles(pids: Pids, roles: Mapping[int, str] | None) -> dict[int, str]:
    """pid -> role, in the given order, without duplicates."""
    given: Mapping[int, str] = roles if roles is not None else {}
    if roles is None and isinstance(pids, Mapping):
        given = pids
    try:
        listed = list(pids)
    except TypeError as exc:
        raise MemoryReportError(
            f"memory_report: pids must be an iterable of ints or a mapping pid -> role, "
            f"not {type(pids).__name__}"
        ) from exc
    me = os.getpid()
    return {
        _checked_pid(pid): given.get(pid, "parent" if pid == me else "worker") for pid in listed
    }


def _read(pid: int, role: str) -> ProcessMemory | None:
    """One process's memory, or None if it is gone."""
    try:
        process = psutil.Process(pid)
        info = process.memory_full_info()
        # A zombie (exited, not yet reaped by its parent) reads as all zeros.
        if info.rss == 0 and process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:  # includes ZombieProcess: it exited, nothing left to measure
        return None
    except psutil.AccessDenied as exc:
        raise MemoryAccessError(
            f"memory_report: reading the memory of process {pid} ({role}) was denied by "
            "the OS; run as the user that owns it (or root), or report only on processes "
            "you own, such as your pool's workers"
        ) from exc
    seg_rss, seg_pss, seg_uss = _segment_pages(pid)
    return ProcessMemory(
        pid=pid,
        role=role,
        rss=info.rss,
        uss=info.uss,
        pss=info.pss,
        shared=max(info.rss - info.uss, 0),
        swap=info.swap,
        segment_rss=seg_rss,
        segment_pss=seg_pss,
        segment_uss=seg_uss,
    )


_SMAPS_FIELDS = {b"Rss:": 0, b"Pss:": 1, b"Private_Clean:": 2, b"Private_Dirty:": 2}


def _segment_pages(pid: int) -> tuple[int, int, int]:
    """Rss, Pss and private bytes of ``pid``'s mappings of segment files, from its smaps.

    psutil sums smaps over every mapping; the split by file needs the
    per-mapping lines. A segment is any file of the segment directory, named
    or not (an unnamed one shows as ``<dir>/#<inode> (deleted)``). A process
    that ends (or denies) meanwhile reads as no segment pages.
    """
    prefix = os.path.realpath(segment_dir()).encode() + b"/"
    totals = [0, 0, 0]
    inside = False
    try:
        with open(f"/proc/{pid}/smaps", "rb") as smaps:
            for line in smaps:
                head = line.split(None, 1)[0] if line.strip() else b""
                if b"-" in head and not head.endswith(b":"):  # a mapping's header line
                    fields = line.split(None, 5)
                    inside = len(fields) == 6 and fields[5].startswith(prefix)
                elif inside and head in _SMAPS_FIELDS:
                    totals[_SMAPS_FIELDS[head]] += int(line.split()[1]) * 1024
    except OSError:
        return 0, 0, 0
    return totals[0], totals[1], totals[2]


def memory_report(pids: Pids, *, roles: Mapping[int, str] | None = None) -> MemoryReport:
    """Measure the memory of processes now: RSS, USS, PSS, shared and swap, with totals.

    ``pids`` is an iterable of process ids, or a mapping of pid to role (then
    ``roles`` is not needed). Roles default to ``"parent"`` for this process
    and ``"worker"`` for the others. A process that has exited by the time it
    is read is listed in ``MemoryReport.missing`` instead of failing the
    report.

    Raises:
        MemoryReportError: a pid is not a non-negative int.
        MemoryAccessError: the OS denied reading a process (another user's).
    """
    role_of = _roles(pids, roles)
    processes: list[ProcessMemory] = []
    missing: list[int] = []
    for pid, role in role_of.items():
        record = _read(pid, role)
        if record is None:
            missing.append(pid)
        else:
            processes.append(record)
    return MemoryReport(tuple(processes), tuple(missing))


PidSource: TypeAlias = Pids | Callable[[], Pids]


class MemorySampler:
    """Sample processes' memory in a background thread, keeping per-process peaks.

    Short-lived peaks (a worker that allocates, computes and frees within a
    task) are missed by a single report at the end; a sampler running during
    the work catches them, to within its ``interval``::

        with forkref.MemorySampler(pool.pids) as sampler:
            pool.map(work, tasks)
        print(sampler.peaks().table(), sampler.peak_total_pss)

    ``pids`` is a fixed iterable of pids (or mapping pid -> role), or a
    callable returning one, called at every sample: a pool passes a function
    listing its current workers. Processes that exit are kept in the peaks
    with what was measured while they lived.

    The thread holds only a weak reference to the sampler: dropping the
    sampler stops it. ``stop()`` (also on leaving the ``with`` block) is safe
    to call twice, takes a last sample, and re-raises, as a
    :class:`forkref.MemoryReportError`, an error that stopped the thread.
    """

    __module__ = "forkref"

    def __init__(
        self,
        pids: PidSource,
        *,
        interval: float = 0.1,
        roles: Mapping[int, str] | None = None,
    ) -> None:
        """Prepare a sampler; it starts on :meth:`start` or on entering a ``with`` block."""
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise MemoryReportError(
                f"MemorySampler: interval must be a positive number of seconds, not {interval!r}"
            )
        self._source: Callable[[], Pids] = pids if callable(pids) else _fixed(pids)
        self._roles = roles
        self._interval = float(interval)
        self._lock = threading.Lock()
        # The running thread's halt flag, in a list the finalizer shares: a
        # pause for a fork replaces it (see pause_thread).
        self._halt = [threading.Event()]
        self._thread_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = False
        self._owner = os.getpid()
        self._stopped = False
        self._error: BaseException | None = None
        self._peaks: dict[int, ProcessMemory] = {}
        self._missing: list[int] = []
        self._last: MemoryReport | None = None
        self._samples = 0
        self._peak_total_uss = 0
        self._peak_total_pss = 0
        # A dropped, never-stopped sampler must not leave its thread running.
        self._finalizer = weakref.finalize(self, _halt_current, self._halt)

    def start(self) -> MemorySampler:
        """Take a first sample and start the background thread. A second call does nothing."""
        if self._stopped:
            raise MemoryReportError(
                "MemorySampler.start: this sampler was stopped; create a new MemorySampler"
            )
        if not self._started:
            self._started = True
            self.sample()
            with self._thread_lock:
                self._start_thread()
            # No fork copies this thread, and none warns because of it (a thread
            # running across fork() is what Python 3.12+ warns about): forkref's
            # pools fork their generations with it paused, and every other fork
            # of this process (a stdlib pool's, say) stops it for the fork too.
            register_pausable(self)
            pause_at_every_fork(self)
        return self

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=_sample_until_stopped,
            args=(weakref.ref(self), self._halt[0], self._interval),
            name="forkref-memory-sampler",
            daemon=True,
        )
        self._thread.start()

    def pause_thread(self) -> bool:
        """Stop the thread for a fork (forkref._fork.safe.Pausable); True if it ran."""
        with self._thread_lock:
            thread = self._thread
            if self._stopped or thread is None or thread is threading.current_thread():
                return False
            self._halt[0].set()
            thread.join()
            wait_os_thread_gone(thread.native_id)
            self._halt[0] = threading.Event()
            self._thread = None
            return True

    def resume_thread(self) -> None:
        """Start the thread again after a fork (forkref._fork.safe.Pausable)."""
        with self._thread_lock:
            if not self._stopped and self._thread is None and self._error is None:
                self._start_thread()

    def owned_by_this_process(self) -> bool:
        """False in a forked child that inherited the sampler (forkref._fork.safe.Pausable)."""
        return self._owner == os.getpid()

    def stop(self) -> None:
        """Stop the thread, take a last sample, raise a sampling error if any. Idempotent."""
        if self._stopped:
            return
        with self._thread_lock:
            self._stopped = True
            self._halt[0].set()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self._error is None:
            try:
                self.sample()
            except MemoryReportError:
                raise
            except Exception as exc:
                self._error = exc
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, MemoryReportError):
                raise error
            raise MemoryReportError(
                f"MemorySampler: sampling failed: {error!r}; check the pid source "
                "passed to MemorySampler (it must return ints or a mapping pid -> role)"
            ) from error

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
            return
        # An exception is already propagating: do not replace it with a sampler error.
        with contextlib.suppress(MemoryReportError):
            self.stop()

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def samples(self) -> int:
        """How many samples were taken."""
        return self._samples

    @property
    def last(self) -> MemoryReport | None:
        """The most recent sample, or None before the first."""
        return self._last

    @property
    def peak_total_uss(self) -> int:
        """The highest total USS seen in one sample (all processes at the same moment)."""
        return self._peak_total_uss

    @property
    def peak_total_pss(self) -> int:
        """The highest total PSS seen in one sample, the peak real cost of the processes."""
        return self._peak_total_pss

    def peaks(self) -> MemoryReport:
        """Per-process peaks: each field is that process's maximum over all samples.

        The fields of one record may come from different samples, and the
        totals add peaks that may not have coincided: an upper bound. For the
        peak of the processes together, see :attr:`peak_total_pss`.
        """
        with self._lock:
            missing = tuple(pid for pid in self._missing if pid not in self._peaks)
            return MemoryReport(tuple(self._peaks.values()), missing)

    def sample(self) -> MemoryReport:
        """Take one sample now (the thread calls this every ``interval``) and return it."""
        report = memory_report(self._source(), roles=self._roles)
        with self._lock:
            self._samples += 1
            self._last = report
            self._peak_total_uss = max(self._peak_total_uss, report.total_uss)
            self._peak_total_pss = max(self._peak_total_pss, report.total_pss)
            for record in report.processes:
                seen = self._peaks.get(record.pid)
                self._peaks[record.pid] = record if seen is None else seen.peak_with(record)
            self._missing.extend(pid for pid in report.missing if pid not in self._missing)
        return report

    def _fail(self, error: BaseException) -> None:
        self._error = error


def _fixed(pids: Pids) -> Callable[[], Pids]:
    frozen: Pids = dict(pids) if isinstance(pids, Mapping) else tuple(pids)
    return lambda: frozen


def _halt_current(halt: list[threading.Event]) -> None:
    halt[0].set()


def _sample_until_stopped(
    ref: weakref.ref[MemorySampler], stop: threading.Event, interval: float
) -> None:
    """The sampler thread: holds the sampler only weakly, between samples."""
    # Wait a full interval after each sample, so a slow read never turns into a busy loop.
    while not stop.wait(interval):
        sampler = ref()
        if sampler is None:
            return
        try:
            sampler.sample()
        except Exception as exc:
            sampler._fail(exc)
            return
        finally:
            del sampler
