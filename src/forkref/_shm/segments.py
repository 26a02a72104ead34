"""Shared-memory segments: files in a tmpfs directory that several processes map.

A segment is a plain file in the segment directory (``/dev/shm`` unless the
``FORKREF_SHM_DIR`` environment variable names another one; read in
:func:`segment_dir` and nowhere else). ``shm_open`` does exactly this on
Linux; doing it by hand lets the directory be configured, lets a segment have
no name at all, and keeps ``multiprocessing``'s resource_tracker out of the
way (cpython gh-82300: a process that merely *attaches* to a
``SharedMemory`` registers it and unlinks it at exit; 3.13 added ``track=``).

Two kinds, chosen so that nothing outlives the processes that could still
use it:

* **Anonymous** segments (exports of shared objects) are created with
  ``O_TMPFILE``: they never have a name. The export store keeps the descriptor
  and passes it to workers over a unix socket (``SCM_RIGHTS``). The kernel
  frees the memory when the last descriptor and mapping are gone, whoever
  was killed and however.
* **Named** segments (task results travelling back to the parent) must be
  opened by a process that does not exist yet when they are written, so they
  have a name: ``forkref-r-`` and 128 random bits, mode 0600, created with
  ``O_EXCL``. The importer opens and unlinks it at once. For the window in
  between, a tiny *janitor* process (one per process that writes results,
  inherited by its forked children) unlinks every name whose watched
  processes have all died (the writer and its parent; for a pool's automatic
  results, the writer until the reply is sent, then the pool's parent),
  then exits. Until then a result that is
  never imported stays in the directory, unless the token that names it
  dies in the process that received it (:class:`forkref.ResultToken`).

Before any write, :func:`check_space` compares the size with the free space
of the directory: tmpfs is only reserved as pages are written, and a mapping
that overflows it dies of SIGBUS much later. Writes go through ``pwrite``,
which reports ENOSPC as an error rather than a signal.

Package API (everything else is private):
    segment_dir() -> str
    check_space(nbytes, what) -> None                 raises SharedMemoryFullError
    create_anonymous(nbytes, what, fixes) -> int (fd)  fixes: the no-room advice
    room_fix(directory) -> str                       the advice all no-room errors share
    create_named(nbytes, what) -> (path, fd)         janitor-watched
    publish(fd, what, key) -> path                   an anonymous segment, once written,
                                                     under a result name, unlinked if its
                                                     writer dies before hand_over()
    hand_over(paths, owner) -> None                  the reply naming them is sent: keep
                                                     them while their receiver lives
    sweep(key) -> int                                unlink the names made with a key
    write_at(fd, offset, data, what) -> None
    map_readonly(fd, size) -> mmap.mmap
    open_and_unlink(path, what) -> (fd, size)
    RESULT_PREFIX

Non-goals: segments are not persistent storage and not a way to share
*mutable* memory between processes; every mapping made here is read-only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import secrets
import stat
import sys
import threading

from forkref import _os
from forkref._errors import SharedMemoryError, SharedMemoryFullError
from forkref._os import unlink_quietly

__all__ = [
    "RESULT_PREFIX",
    "check_space",
    "create_anonymous",
    "create_named",
    "hand_over",
    "map_readonly",
    "open_and_unlink",
    "publish",
    "room_fix",
    "segment_dir",
    "sweep",
    "write_at",
]

ENV_DIR = "FORKREF_SHM_DIR"
RESULT_PREFIX = "forkref-r-"
_DEFAULT_DIR = "/dev/shm"
# Linux caps one read/write at 0x7ffff000 bytes; stay under it.
_MAX_IO = 1 << 30


def segment_dir() -> str:
    """The directory segments live in: ``$FORKREF_SHM_DIR`` or ``/dev/shm``.

    The one place forkref reads the environment for shared memory. Any
    directory works; a tmpfs keeps the segments in RAM.
    """
    return os.environ.get(ENV_DIR) or _DEFAULT_DIR


def room_fix(directory: str) -> str:
    """The fix every full-directory error shares: more room for the segments."""
    return (
        f"give {directory} more room (Docker: run with a larger --shm-size, e.g. "
        f"--shm-size=8g), or point the environment variable {ENV_DIR} at a directory with "
        "room (a tmpfs keeps it in RAM)"
    )


def _fixes(directory: str, results: bool) -> str:
    room = room_fix(directory)
    if results:  # results always travel through segments, whatever the start method
        return (
            f"Fixes: {room}; or import_result() the results already exported sooner, "
            "which frees their segments"
        )
    # Said for both kinds of pool: the exporting process does not know which
    # kind of pool the worker that asked for the object belongs to.
    return (
        f"Fixes: {room}; or start the workers with the 'fork' method, whose workers inherit "
        "the object and need no shared memory: forkref.Pool's default (leave out its "
        "context/mp_context argument), multiprocessing.get_context('fork') for a stdlib pool"
    )


def check_space(nbytes: int, what: str, results: bool = False, fixes: str | None = None) -> None:
    """Raise :class:`SharedMemoryFullError` unless ``nbytes`` fit in the segment directory.

    ``fixes`` replaces the default advice, for callers whose segment serves
    another purpose than an export or an exported result.
    """
    directory = segment_dir()
    try:
        st = os.statvfs(directory)
    except OSError as err:
        raise SharedMemoryError(
            f"cannot check free space for {what}: segment directory {directory!r} is not "
            f"usable ({err}). Create it or set {ENV_DIR} to an existing directory"
        ) from err
    available = st.f_bavail * st.f_frsize
    if nbytes > available:
        raise _full_error(nbytes, available, what, directory, results, fixes=fixes)


def _full_error(
    nbytes: int,
    available: int,
    what: str,
    directory: str,
    results: bool = False,
    *,
    fixes: str | None = None,
) -> SharedMemoryFullError:
    return SharedMemoryFullError(
        f"cannot write {what} to shared memory: it needs {nbytes} bytes "
        f"({nbytes / 2**20:.1f} MiB) and {directory} has {available} bytes "
        f"({available / 2**20:.1f} MiB) free. {fixes or _fixes(directory, results)}"
    )


def create_anonymous(nbytes: int, what: str, fixes: str | None = None) -> int:
    """Create an unnamed segment of ``nbytes`` (after a space check) and return its fd.

    ``fixes``: the advice if there is no room (default: an export's).
    """
    check_space(nbytes, what, fixes=fixes)
    directory = segment_dir()
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError):
        # No O_TMPFILE (not Linux, or a filesystem without it): a random name
        # that lives only between these two calls.
        path, fd = _create_exclusive(directory, "forkref-a-", what)
        os.unlink(path)
    _truncate(fd, nbytes, what, directory)
    return fd


def create_named(nbytes: int, what: str) -> tuple[str, int]:
    """Create a named segment of ``nbytes`` (after a space check), janitor-watched."""
    check_space(nbytes, what, results=True)
    directory = segment_dir()
    path, fd = _create_exclusive(directory, RESULT_PREFIX, what)
    try:
        # Watched before it is filled, so a crash from here on is cleaned up.
        _janitor_watch(path, what)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    _truncate(fd, nbytes, what, directory, path)
    return path, fd


def publish(fd: int, what: str, key: str = "") -> str:
    """Give a written anonymous segment a result name; return the path.

    For results written before they have a name: a writer that dies while
    writing leaves nothing behind (the segment never had a name), and one
    that dies before :func:`hand_over` leaves nothing either (the janitor
    watches the writer alone until then, from before the name exists: no
    instant has a name nobody watches). ``key`` (a pool's) goes into the
    name, for :func:`sweep`. Linux only (``O_TMPFILE`` and ``/proc``);
    elsewhere raises :class:`SharedMemoryError`.
    """
    directory = segment_dir()
    name = RESULT_PREFIX + (f"{key}-" if key else "") + secrets.token_hex(16)
    path = os.path.join(directory, name)
    _janitor_watch(path, what, [os.getpid()], new=True)
    try:
        # With a dir_fd, os.link calls linkat(AT_SYMLINK_FOLLOW); without, link(),
        # which would link the /proc symlink itself (EXDEV).
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise SharedMemoryError(
            f"cannot name the segment for {what} in {directory!r}: {err}"
        ) from err
    return path


def hand_over(paths: list[str], owner: int | None = None) -> None:
    """The reply naming ``paths`` is on its way: keep them while the receiver lives.

    ``owner``: the pid of the process that will open them (a pool's parent,
    whatever process forked the writer: a fork server, a forkserver); without
    it, the writer and its parent.
    """
    for path in paths:
        _janitor_watch(path, "a result", None if owner is None else [owner])


def sweep(key: str) -> int:
    """Unlink every result name made with ``key`` (see :func:`publish`); how many.

    For a pool's parent once it will decode no more replies: results in
    replies it never read (a terminated pool) go now, not when it exits.
    """
    prefix = f"{RESULT_PREFIX}{key}-"
    directory = segment_dir()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        unlink_quietly(os.path.join(directory, name))
    return len(names)


def _create_exclusive(directory: str, prefix: str, what: str) -> tuple[str, int]:
    path = os.path.join(directory, prefix + secrets.token_hex(16))
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        # O_EXCL with 128 random bits: no collision, and no planted file or
        # symlink in a world-writable /dev/shm can be opened instead.
        return path, os.open(path, flags, 0o600)
    except OSError as err:
        raise SharedMemoryError(
            f"cannot create a shared-memory segment for {what} in {directory!r}: {err}. "
            f"Check that the directory exists and is writable, or set {ENV_DIR}"
        ) from err


def _truncate(fd: int, nbytes: int, what: str, directory: str, path: str | None = None) -> None:
    try:
        os.ftruncate(fd, nbytes)
    except OSError as err:
        os.close(fd)
        if path is not None:
            unlink_quietly(path)
        raise SharedMemoryError(
            f"cannot size the shared-memory segment for {what} to {nbytes} bytes "
            f"in {directory!r}: {err}"
        ) from err


def write_at(fd: int, offset: int, data: memoryview | bytes, what: str) -> None:
    """Copy ``data`` into the segment at ``offset``; ENOSPC becomes SharedMemoryFullError."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done : done + _MAX_IO], offset + done)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                directory = segment_dir()
                free = os.statvfs(directory)
                raise _full_error(
                    len(view), free.f_bavail * free.f_frsize, what, directory
                ) from err
            raise SharedMemoryError(f"cannot write {what} to shared memory: {err}") from err


def map_readonly(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of a segment read-only: no write can reach the segment.

    Before Python 3.13 the mapping keeps a duplicate of ``fd`` open until it
    is unmapped (``trackfd=False`` exists only from 3.13, gh-78502); from
    3.13 it keeps none. Either way the caller closes ``fd`` itself.
    """
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, trackfd=False)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def open_and_unlink(path: str, what: str) -> tuple[int, int]:
    """Open a named segment, remove its name at once, return ``(fd, size)``.

    Only files this user made with mode 0600 and the forkref prefix are
    accepted: a token naming any other file is refused, never opened for use.
    """
    if not os.path.basename(path).startswith(RESULT_PREFIX):
        raise SharedMemoryError(f"refusing to open {path!r} for {what}: not a forkref segment")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise SharedMemoryError(
            f"cannot open the shared-memory segment {path!r} for {what}: {err}. It was "
            "already imported once, or its writer and the writer's parent both died"
        ) from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        raise SharedMemoryError(
            f"refusing the segment {path!r} for {what}: not a private file of this user"
        )
    unlink_quietly(path)
    return fd, st.st_size


# -- the janitor ---------------------------------------------------------------
#
# Reads one JSON line per named segment ({"path": ..., "pids": [...]}, with
# "new": true if the name does not exist yet) on stdin; every 0.2 s forgets
# names that existed and are gone, and unlinks names whose pids are all dead
# (zombies count as dead), whether or not the name exists yet: a writer
# announces a name before it creates it, so a writer killed in between leaves
# nothing. Exits once stdin is closed (every process holding
# the pipe is gone) and nothing is left to watch. It ignores SIGINT and runs
# in its own session, so a Ctrl-C that kills the writers does not kill their
# cleaner.
_JANITOR_CODE = r"""
import os
# Drop every descriptor inherited from the writer first: holding the end of
# a pool's pipe would hide the writer's death from its pool.
os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
import json, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
# forkref._os, run from its file (argv[2]): forkref itself is not imported here.
helpers = {"__name__": "forkref_os"}
with open(sys.argv[2], "rb") as f:
    exec(compile(f.read(), sys.argv[2], "exec"), helpers)
alive = helpers["process_running"]
watched, seen, buf, reading = {}, set(), b"", True
while reading or watched:
    if not reading:
        time.sleep(0.2)
    # Everything written so far is read before any pid is judged: a writer's
    # later line for a path (a hand-over to the parent) must win over its first.
    wait, chunks = 0.2, 0
    while reading and chunks < 256 and select.select([0], [], [], wait)[0]:
        chunk = os.read(0, 65536)
        reading = bool(chunk)
        wait, chunks = 0, chunks + 1
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
                watched[msg["path"]] = msg["pids"]
                if not msg.get("new"):  # it existed when sent
                    seen.add(msg["path"])
            except Exception:
                pass
    for path, pids in list(watched.items()):
        if os.path.lexists(path):
            seen.add(path)
        elif path in seen:
            seen.discard(path)
            del watched[path]
            continue
        if not any(alive(p) for p in pids):
            try:
                os.unlink(path)
            except OSError:
                pass
            seen.discard(path)
            del watched[path]
"""

_janitor_lock = threading.Lock()
_janitor_fd: int | None = None  # write end of the janitor's stdin
_janitor_pid: int | None = None  # set only in the process that started it
_watched: dict[str, bytes] = {}  # path -> the line sent for it, by this process
_WATCHED_PRUNE_AT = 256
_prune_at = _WATCHED_PRUNE_AT


def _watched_pids() -> list[int]:
    """The writer, and its parent while that is still the one that will import.

    An orphan's parent is init (or a subreaper), which never dies: watching
    it would keep the name forever. For multiprocessing workers the original
    parent is known, so adoption by a subreaper is recognized too.
    """
    import multiprocessing

    ppid = os.getppid()
    original = multiprocessing.parent_process()
    adopted = original is not None and original.pid != ppid and not _exists(original.pid)
    return [os.getpid()] if ppid == 1 or adopted else [os.getpid(), ppid]


def _exists(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _janitor_watch(path: str, what: str, pids: list[int] | None = None, new: bool = False) -> None:
    # A second line for a path replaces its pids (the janitor keeps the last).
    msg = {"path": path, "pids": pids or _watched_pids(), "new": new}
    line = json.dumps(msg).encode() + b"\n"
    with _janitor_lock:
        fd = _janitor_fd if _janitor_fd is not None else _start_janitor()
        _remember(path, line)
        try:
            # One write under PIPE_BUF is atomic, even with forked children
            # writing to the same inherited pipe.
            os.write(fd, line)
        except BrokenPipeError:
            # The janitor died (killed with its session, or by hand): its
            # pipe is useless from now on, and what it watched is forgotten.
            # Start a new one, once, and tell it everything still there.
            _forget_janitor()
            try:
                fd = _start_janitor()
                for old_path, old_line in list(_watched.items()):
                    if os.path.lexists(old_path):
                        os.write(fd, old_line)
            except OSError as err:
                raise SharedMemoryError(
                    f"cannot hand the segment for {what} to forkref's segment janitor: it "
                    f"died, and so did its replacement ({err}). Check that {sys.executable} "
                    "can run and that processes are not killed by a resource limit"
                ) from err
        except OSError as err:
            raise SharedMemoryError(
                f"cannot hand the segment for {what} to forkref's segment janitor: {err}"
            ) from err


def _remember(path: str, line: bytes) -> None:
    # What this process asked its janitor to watch, for a replacement janitor.
    # Kept small: names already imported (gone) are dropped now and then.
    global _prune_at
    if len(_watched) >= _prune_at:
        for old in [p for p in _watched if not os.path.lexists(p)]:
            del _watched[old]
        _prune_at = max(_WATCHED_PRUNE_AT, 2 * len(_watched))  # amortized
    _watched[path] = line


def _forget_janitor() -> None:
    """Drop the pipe to a dead janitor, reaping it if this process started it."""
    global _janitor_fd, _janitor_pid
    fd, pid = _janitor_fd, _janitor_pid
    _janitor_fd = _janitor_pid = None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # its pipe end is closed: it has exited


def _start_janitor() -> int:
    global _janitor_fd, _janitor_pid
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", "-c", _JANITOR_CODE, "forkref-janitor", _os.__file__],
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                # Not the writer's stdout/stderr: a caller reading them to EOF
                # must not wait for the janitor.
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except OSError as err:
        os.close(write_end)
        raise SharedMemoryError(
            f"cannot start forkref's segment janitor ({sys.executable}): {err}"
        ) from err
    finally:
        os.close(read_end)
    if not _janitor_registered:
        _register_fork_hook()
    _janitor_fd, _janitor_pid = write_end, pid
    return write_end


def stop_janitor() -> None:
    """Close this process's pipe to the janitor and reap it if we started it.

    The janitor still unlinks what it must before it exits. Idempotent; for
    tests and orderly shutdown (a process exit closes the pipe anyway).
    """
    global _janitor_fd, _janitor_pid
    with _janitor_lock:
        fd, pid = _janitor_fd, _janitor_pid
        _janitor_fd = _janitor_pid = None
    if fd is not None:
        os.close(fd)
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


_janitor_registered = False


def _register_fork_hook() -> None:
    global _janitor_registered
    _janitor_registered = True
    os.register_at_fork(after_in_child=_after_fork_child)


def _after_fork_child() -> None:
    global _janitor_lock, _janitor_pid, _watched
    # The child keeps writing to the inherited janitor (its pipe end is
    # inherited), but it is not the janitor's parent and must not reap it,
    # nor re-send its parent's segments to a janitor of its own.
    _janitor_lock = threading.Lock()
    _janitor_pid = None
    _watched = {}
