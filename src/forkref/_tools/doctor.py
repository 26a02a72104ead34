"""``forkref doctor``: what matters for forkref on this machine, in plain words.

Two parts. *Facts*, read without side effects (no import of the optional
packages, versions come from their installed metadata): Python and its start
methods, the shared-memory directory, transparent huge pages, the threads of
this process, installed packages, notebook or not. *Verdicts*, one per
capability (fork inheritance, shared memory, compact containers, the Ray
backend), each from a small real probe where one is cheap (a fork that
resolves a shared object, a segment written in the segment directory, a
compact container round trip), with the fix where one applies.

The bench reuses :func:`machine` and :func:`versions` for its captions.

Non-goals: no tuning advice beyond what forkref itself depends on, no
network or hardware tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import multiprocessing
import os
import pickle
import platform
import sys
import textwrap
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PACKAGES", "Diagnosis", "Verdict", "diagnose", "machine", "render", "versions"]

#: Packages whose presence changes what forkref can do, and the optional ones it works with.
PACKAGES = (
    "psutil",
    "tqdm",
    "numpy",
    "pandas",
    "pyarrow",
    "ray",
    "joblib",
    "mpire",
    "rich",
    "matplotlib",
    "ipywidgets",
)
_THP = "/sys/kernel/mm/transparent_hugepage"
_LOW_SHM = 2**30  # below this, a big export will not fit (Docker gives 64 MB)

OK, WARN, FAIL, UNAVAILABLE = "ok", "warn", "fail", "unavailable"


@dataclass(frozen=True)
class Verdict:
    """Whether one capability works here.

    Attributes:
        capability: ``fork inheritance``, ``shared memory``, ``compact
            containers`` or ``Ray backend``.
        status: ``ok``; ``warn`` (works, with a cost or a caveat);
            ``fail`` (does not work here); ``unavailable`` (optional, not
            installed or not built).
        detail: what was found, in plain words.
        fix: what to do about it, or None.
    """

    capability: str
    status: str
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Diagnosis:
    """Facts about this machine and process, and a verdict per capability."""

    facts: dict[str, Any]
    verdicts: tuple[Verdict, ...]

    @property
    def exit_code(self) -> int:
        """1 when a capability fails here, else 0 (warnings and optional parts do not count)."""
        return 1 if any(v.status == FAIL for v in self.verdicts) else 0

    def as_dict(self) -> dict[str, Any]:
        """The diagnosis as plain JSON-ready data."""
        return {
            "facts": self.facts,
            "verdicts": [asdict(v) for v in self.verdicts],
            "exit_code": self.exit_code,
        }


# -- facts -------------------------------------------------------------------------


def versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, None when missing (read from metadata, not imported)."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine in one record: CPU, cores, memory, OS, Python."""
    import psutil

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "os": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def _default_start_method() -> str:
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen is not None:
        return chosen
    # Reading the default without fixing it for this process (get_start_method() would).
    ctx = getattr(multiprocessing.context, "_default_context", None)
    default = getattr(ctx, "_default_context", None)
    if default is not None:
        return str(default.get_start_method())
    return multiprocessing.get_context().get_start_method()


def _start_methods() -> dict[str, Any]:
    available = multiprocessing.get_all_start_methods()
    default = _default_start_method()
    notes = []
    if default == "fork" and sys.version_info < (3, 14):
        notes.append(
            "from Python 3.14 the stdlib default on Linux is forkserver: stdlib pools then "
            "stop inheriting shared objects unless given multiprocessing.get_context('fork'); "
            "forkref.Pool forks on every version"
        )
    if default != "fork" and "fork" in available:
        notes.append(
            f"the stdlib pools start workers with {default!r} here (Python 3.14 made "
            "forkserver the default on Linux): they do not inherit shared objects; handles "
            "then go through shared memory. forkref.Pool forks anyway; for a stdlib pool "
            "pass multiprocessing.get_context('fork')"
        )
    return {"available": available, "default": default, "notes": notes}


def _fs_type(path: str) -> str | None:
    best, kind = "", None
    with contextlib.suppress(OSError), open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def _shared_memory() -> dict[str, Any]:
    from forkref._shm import segments as _shm

    directory = _shm.segment_dir()
    facts: dict[str, Any] = {
        "directory": directory,
        "from_environment": bool(os.environ.get(_shm.ENV_DIR)),
        "filesystem": _fs_type(os.path.realpath(directory)),
        "size_bytes": None,
        "free_bytes": None,
    }
    with contextlib.suppress(OSError):
        st = os.statvfs(directory)
        facts["size_bytes"] = st.f_blocks * st.f_frsize
        facts["free_bytes"] = st.f_bavail * st.f_frsize
    return facts


def _read_mode(path: str) -> str | None:
    """The selected ``[mode]`` of a sysfs THP file, or None if absent."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else text.strip()


def _huge_pages() -> dict[str, Any]:
    anon = _read_mode(f"{_THP}/enabled")
    shmem = _read_mode(f"{_THP}/shmem_enabled")
    defrag = _read_mode(f"{_THP}/defrag")
    notes = [*_anon_notes(anon), *_shmem_notes(shmem), *_defrag_notes(defrag)]
    return {"anonymous": anon, "shmem": shmem, "defrag": defrag, "notes": notes}


# What fork costs: one page-table entry copied per 4 KiB page of heap, one
# per 2 MiB huge page (plus a 4 KiB table the kernel sets aside for a later
# split). benchmarks/bench_scale.py measures both; docs/guide/scale.md.
def _anon_notes(anon: str | None) -> list[str]:
    if anon == "always":
        return [
            "anonymous memory uses 2 MiB huge pages everywhere: fork copies fewer page-table "
            "entries (faster), but a worker's first write to an inherited page (a reference "
            "count is enough) copies 2 MiB instead of 4 KiB, so workers iterating inherited "
            "Python objects grow much faster; compact() containers avoid those writes"
        ]
    if anon == "madvise":
        return [
            "anonymous memory: madvise: a write to an inherited page copies 4 KiB. Fork "
            "cost: numpy asks for huge pages for big arrays, so an array heap forks fast "
            "(one entry per 2 MiB); Python objects sit on 4 KiB pages, so fork copies about "
            "2 MiB of page tables per GiB of objects, per worker, and takes several times "
            "longer (benchmarks/bench_scale.py measures it)"
        ]
    if anon == "never":
        return [
            "anonymous memory: never: every heap is on 4 KiB pages; fork copies about 2 MiB "
            "of page tables per GiB of heap, per worker, arrays included"
        ]
    return []


def _shmem_notes(shmem: str | None) -> list[str]:
    if shmem in ("never", "deny", "advise"):
        return [f"shared memory: {shmem}: segments use 4 KiB pages"]
    if shmem in ("always", "within_size", "force"):
        return [
            f"shared memory: {shmem}: segments may use 2 MiB pages: fewer page faults when "
            "workers map an export, memory reserved in 2 MiB steps"
        ]
    return []


def _defrag_notes(defrag: str | None) -> list[str]:
    if defrag == "always":
        return [
            "defrag: always: allocating a huge page may stall to compact memory, so "
            "building a big heap (and a worker's first copy-on-write of a huge page) can pause"
        ]
    if defrag in ("defer", "defer+madvise", "madvise"):
        return [
            f"defrag: {defrag}: no stalls for programs that did not ask for huge pages"
            + (
                "; numpy's big arrays ask, and may wait for compaction"
                if "madvise" in defrag
                else ""
            )
        ]
    if defrag == "never":
        return ["defrag: never: huge pages only where free 2 MiB blocks exist, never a stall"]
    return []


def _threads() -> dict[str, Any]:
    import psutil

    names = [t.name for t in threading.enumerate()]
    try:
        native = psutil.Process().num_threads()
    except psutil.Error:
        native = None
    return {"python": names, "native": native}


def _notebook() -> dict[str, Any]:
    shell = None
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        get = getattr(ipython, "get_ipython", None)
        instance = get() if callable(get) else None
        shell = type(instance).__name__ if instance is not None else None
    return {"shell": shell, "notebook": shell == "ZMQInteractiveShell"}


def facts() -> dict[str, Any]:
    """Everything :func:`diagnose` reports besides the verdicts."""
    import forkref

    return {
        "forkref": forkref.__version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "machine": machine(),
        "start_methods": _start_methods(),
        "shared_memory": _shared_memory(),
        "huge_pages": _huge_pages(),
        "threads": _threads(),
        "packages": versions(),
        "notebook": _notebook(),
    }


# -- verdicts ----------------------------------------------------------------------


def _fork_probe() -> str | None:
    """Fork a child that resolves a shared object; None if it got the object itself."""
    from forkref._share.handle import share

    payload = {"probe": 42}
    with share(payload) as handle:
        blob = pickle.dumps(handle)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # threads: reported apart
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the probe child
            code = 1
            try:
                code = 0 if pickle.loads(blob) is payload else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"the forked probe did not get the object (exit status {code})"


def _fork_verdict(found: dict[str, Any]) -> Verdict:
    name = "fork inheritance"
    if "fork" not in found["start_methods"]["available"]:
        return Verdict(
            name,
            FAIL,
            "this platform has no fork start method: workers never inherit objects",
            "handles still work through shared memory (Linux); run on Linux for fork",
        )
    problem = _fork_probe()
    if problem:
        return Verdict(name, FAIL, problem, "report this with the output of forkref doctor --json")
    detail = "a forked child got the shared object itself (no copy, no pickle)"
    # forkref's own threads ("forkref-*") are paused around its forks; others are not.
    others = [
        n
        for n in found["threads"]["python"]
        if n != threading.current_thread().name and not n.startswith("forkref-")
    ]
    if found["huge_pages"]["anonymous"] == "always":
        return Verdict(
            name,
            WARN,
            detail + "; but transparent huge pages are 'always' for anonymous memory, so "
            "copy-on-write copies 2 MiB per touched page",
            "as root: echo madvise > /sys/kernel/mm/transparent_hugepage/enabled; or keep "
            "many small objects in forkref.compact() containers",
        )
    if others:
        return Verdict(
            name,
            WARN,
            detail + f"; other threads run in this process ({', '.join(others)}): a fork "
            "while they hold a lock can hang the child, and forkref pools warn (ForkWarning)",
            "create pools before starting threads, or stop those threads around the pool",
        )
    return Verdict(name, OK, detail)


def _shm_probe() -> str | None:
    from forkref._shm import segments as _shm

    try:
        fd = _shm.create_anonymous(1 << 16, "forkref doctor's probe segment")
    except Exception as err:
        return str(err)
    os.close(fd)
    return None


def _shm_verdict(found: dict[str, Any]) -> Verdict:
    name = "shared memory"
    shm = found["shared_memory"]
    if not sys.platform.startswith("linux"):
        return Verdict(
            name, FAIL, f"the transport needs Linux; this is {sys.platform}", "use fork workers"
        )
    problem = _shm_probe()
    if problem:
        return Verdict(
            name,
            FAIL,
            f"cannot write a segment in {shm['directory']}: {problem}",
            "set FORKREF_SHM_DIR to a writable directory (a tmpfs keeps it in RAM)",
        )
    free = shm["free_bytes"] or 0
    detail = f"segments go to {shm['directory']} ({_size(free)} free)"
    if free < _LOW_SHM:
        return Verdict(
            name,
            WARN,
            detail + ": an object bigger than that cannot go to spawn or late workers "
            "(Docker's default /dev/shm is 64 MB)",
            "Docker: run with --shm-size=8g; or set FORKREF_SHM_DIR to a directory with "
            "room; or use fork workers, which need no shared memory",
        )
    return Verdict(name, OK, detail + "; spawn, forkserver and late workers map objects zero-copy")


def _compact_verdict() -> Verdict:
    name = "compact containers"
    from forkref._memory.compact import compact
    from forkref._memory.compactdict import compact_dict

    items = [{"id": 1}, {"id": 2}]
    try:
        ok = list(compact(items)) == items and dict(compact_dict({"a": 1})) == {"a": 1}
    except Exception as err:
        return Verdict(
            name,
            FAIL,
            f"a compact() round trip failed: {err!r}",
            "report this with the output of forkref doctor --json",
        )
    if not ok:
        return Verdict(
            name,
            FAIL,
            "a compact() round trip returned other items",
            "report this with the output of forkref doctor --json",
        )
    return Verdict(
        name, OK, "compact() and compact_dict() work: workers read them without copying pages"
    )


def _ray_verdict(found: dict[str, Any]) -> Verdict:
    name = "Ray backend"
    version = found["packages"].get("ray")
    if version is None:
        return Verdict(name, UNAVAILABLE, "ray is not installed", "pip install 'forkref[ray]'")
    return Verdict(name, OK, f"forkref.Pool(backend='ray') can run on ray {version}")


def diagnose() -> Diagnosis:
    """Read the facts, run the probes, give a verdict per capability."""
    found = facts()
    verdicts = (
        _fork_verdict(found),
        _shm_verdict(found),
        _compact_verdict(),
        _ray_verdict(found),
    )
    return Diagnosis(found, verdicts)


# -- text ----------------------------------------------------------------------------


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "unknown"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.0f} MiB"


def _fact_lines(f: dict[str, Any]) -> list[tuple[str, str]]:
    m, sm, shm, thp, th = (
        f["machine"],
        f["start_methods"],
        f["shared_memory"],
        f["huge_pages"],
        f["threads"],
    )
    source = "from FORKREF_SHM_DIR" if shm["from_environment"] else "FORKREF_SHM_DIR is not set"
    packages = ", ".join(
        f"{k} {v}" if v else f"{k} not installed" for k, v in f["packages"].items()
    )
    lines = [
        ("Python", f"{f['python']['version']} ({f['python']['executable']})"),
        ("Machine", f"{m['cores']} cores, {_size(m['memory_bytes'])}, {m['cpu']}, {m['os']}"),
        (
            "Start methods",
            f"{', '.join(sm['available'])}; the stdlib default here is {sm['default']}; "
            "forkref.Pool uses fork",
        ),
        *[("", note) for note in sm["notes"]],
        (
            "Shared memory",
            f"{shm['directory']} ({shm['filesystem'] or 'unknown filesystem'}): "
            f"{_size(shm['size_bytes'])}, {_size(shm['free_bytes'])} free; {source}",
        ),
        (
            "Huge pages",
            f"anonymous memory: {thp['anonymous']}; shared memory: {thp['shmem']}; "
            f"defrag: {thp['defrag']}",
        ),
        *[("", note) for note in thp["notes"]],
        (
            "Threads",
            f"{_count(len(th['python']), 'Python thread')} in this process "
            f"({', '.join(th['python'])}); {_count(th['native'] or 0, 'thread')} in all, "
            "native ones (BLAS, arrow) included",
        ),
        ("Packages", packages),
        ("Notebook", "yes" if f["notebook"]["notebook"] else "no"),
    ]
    return lines


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _wrapped(first: str, text: str, width: int) -> list[str]:
    indent = " " * len(first)
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=indent) or [first]


def render(diagnosis: Diagnosis, width: int = 100) -> str:
    """The diagnosis as plain text for a terminal, wrapped at ``width`` columns."""
    f = diagnosis.facts
    out = [f"forkref {f['forkref']} doctor", ""]
    for label, text in _fact_lines(f):
        out += _wrapped(f"{label:<15}", text, width)
    out += ["", "Verdicts"]
    for v in diagnosis.verdicts:
        out += _wrapped(f"  {v.status.upper():<12}", f"{v.capability}: {v.detail}", width)
        if v.fix:
            out += _wrapped(f"  {'':<12}", f"fix: {v.fix}", width)
    return "\n".join(out)
