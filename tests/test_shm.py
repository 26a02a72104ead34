"""Segments (forkref._shm.segments): naming, modes, the space check, the janitor."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import forkref
from forkref._shm import segments as _shm

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def _names(directory: str) -> set[str]:
    return set(os.listdir(directory))


def test_segment_dir_is_dev_shm_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_shm.ENV_DIR, raising=False)
    assert _shm.segment_dir() == "/dev/shm"
    monkeypatch.setenv(_shm.ENV_DIR, "/somewhere")
    assert _shm.segment_dir() == "/somewhere"


@pytest.mark.smoke
def test_anonymous_segment_never_has_a_name() -> None:
    before = _names(_shm.segment_dir())
    fd = _shm.create_anonymous(3 * MiB, "a test segment")
    try:
        _shm.write_at(fd, 0, b"x" * MiB, "a test segment")
        assert _names(_shm.segment_dir()) == before
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 3 * MiB
        mapping = _shm.map_readonly(fd, st.st_size)
        assert mapping[:3] == b"xxx"
        with pytest.raises(TypeError):
            mapping[0:1] = b"y"  # read-only mapping
        mapping.close()
    finally:
        os.close(fd)
    assert _names(_shm.segment_dir()) == before


def test_named_segment_is_private_random_and_unlinked_on_open() -> None:
    path, fd = _shm.create_named(MiB, "a test result")
    path2, fd2 = _shm.create_named(MiB, "a test result")
    os.close(fd2)
    try:
        name = os.path.basename(path)
        assert name.startswith(_shm.RESULT_PREFIX)
        assert len(name) - len(_shm.RESULT_PREFIX) == 32  # 128 random bits
        assert path != path2
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.close(fd)
        rfd, size = _shm.open_and_unlink(path, "a test result")
        os.close(rfd)
        assert size == MiB
        assert not os.path.exists(path)
        with pytest.raises(forkref.SharedMemoryError, match="already imported"):
            _shm.open_and_unlink(path, "a test result")
    finally:
        for p in (path, path2):
            if os.path.exists(p):
                os.unlink(p)
        _shm.stop_janitor()


def test_open_refuses_foreign_files(tmp_path: Path) -> None:
    other = tmp_path / "passwd"
    other.write_text("x")
    with pytest.raises(forkref.SharedMemoryError, match="not a forkref segment"):
        _shm.open_and_unlink(str(other), "a result")
    planted = tmp_path / (_shm.RESULT_PREFIX + "0" * 32)
    planted.write_text("x")
    planted.chmod(0o644)
    with pytest.raises(forkref.SharedMemoryError, match="not a private file"):
        _shm.open_and_unlink(str(planted), "a result")
    assert planted.exists()  # refused files are not removed either


@pytest.mark.smoke
def test_too_small_directory_raises_a_clear_error(small_tmpfs: str) -> None:
    with pytest.raises(forkref.SharedMemoryFullError) as info:
        _shm.create_anonymous(2 * MiB, "the shared numpy.ndarray")
    message = str(info.value)
    assert "the shared numpy.ndarray" in message
    assert f"needs {2 * MiB} bytes" in message
    assert small_tmpfs in message
    assert "--shm-size" in message
    assert _shm.ENV_DIR in message
    assert "fork" in message
    assert isinstance(info.value, forkref.Error)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is forkref.SharedMemoryFullError
    assert str(again) == message
    assert _names(small_tmpfs) == set()


def test_overflow_during_write_is_an_error_not_sigbus(small_tmpfs: str) -> None:
    # The space check can be outrun (another process fills the tmpfs after
    # it): the write itself must then fail cleanly.
    fd = _shm.create_anonymous(512 * 1024, "a segment")
    try:
        os.ftruncate(fd, 2 * MiB)  # tmpfs allows a sparse size beyond its room
        with pytest.raises(forkref.SharedMemoryFullError, match="needs"):
            _shm.write_at(fd, 0, b"\1" * (2 * MiB), "a segment")
    finally:
        os.close(fd)
    assert _names(small_tmpfs) == set()


def test_missing_directory_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_shm.ENV_DIR, "/nonexistent/forkref")
    with pytest.raises(forkref.SharedMemoryError, match="FORKREF_SHM_DIR"):
        _shm.create_anonymous(10, "x")


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from forkref._shm import segments as _shm
    path, fd = _shm.create_named(4096, "a result")
    print(path, flush=True)
    if sys.argv[1] == "fork":
        # The writer's forked child: it writes through the inherited janitor.
        pid = os.fork()
        if pid == 0:
            path2, _ = _shm.create_named(4096, "a result")
            print(path2, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("mode", ["plain", "fork"])
def test_janitor_unlinks_names_once_writer_and_its_parent_die(mode: str) -> None:
    # writer and its parent: run the writer under an intermediate shell whose
    # exit we control, so both watched pids die without this test dying.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -c "$0" {mode}', _WRITER],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    paths = out.split()
    assert len(paths) == (2 if mode == "fork" else 1)
    deadline = time.monotonic() + 30
    while any(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(p) for p in paths)


def _janitors_of(directory: str) -> list[psutil.Process]:
    """Janitors started with ``directory`` as their segment directory."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                "forkref-janitor" in proc.cmdline()
                and proc.environ().get(_shm.ENV_DIR) == directory
            ):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _gone_eventually(paths: list[str], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while any(os.path.lexists(p) for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        if os.path.lexists(path):
            os.unlink(path)


_ORPHAN = textwrap.dedent(
    """
    import multiprocessing as mp, os, signal, time
    from forkref._shm import segments as _shm

    def writer(parent_pid):
        while os.getppid() == parent_pid:  # until the parent below is dead
            time.sleep(0.01)
        path, fd = _shm.create_named(4096, "an orphan's result")
        print(path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        mp.get_context("fork").Process(target=writer, args=(os.getpid(),)).start()
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_janitor_of_an_orphaned_writer_unlinks_and_exits(tmp_path: Path) -> None:
    # The writer's parent is dead before it writes: its "parent" is now init
    # (or a subreaper), which never dies, so it must not be waited for.
    directory = str(tmp_path / "segments")
    os.mkdir(directory)
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN)
    env = {**os.environ, _shm.ENV_DIR: directory, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    paths = done.stdout.split()  # read to EOF: the orphan has closed stdout, it is dead
    try:
        assert len(paths) == 1, done.stderr
        assert _gone_eventually(paths)
        deadline = time.monotonic() + 30
        while _janitors_of(directory) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _janitors_of(directory)  # and its janitor exited
    finally:
        for proc in _janitors_of(directory):
            proc.kill()
        _unlink_all(paths)


_JANITOR_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from forkref._shm import segments as _shm
    path1, _ = _shm.create_named(4096, "a result")
    old = _shm._janitor_pid
    os.kill(old, signal.SIGKILL)
    with open(f"/proc/{old}/stat", "rb") as stat:  # wait until it is a zombie
        while stat.read().rsplit(b")", 1)[1].split()[0] != b"Z":
            stat.seek(0)
    path2, _ = _shm.create_named(4096, "a result")
    new = _shm._janitor_pid
    print(path1, path2, flush=True)
    assert new not in (None, old) and not os.path.exists(f"/proc/{old}"), (old, new)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_dead_janitor_is_replaced_and_the_new_one_cleans_up_everything() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # Under a shell that exits, so both watched pids (writer and parent) die.
    proc = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "$0"', _JANITOR_KILLER],
        capture_output=True,
        env=env,
        text=True,
        timeout=60,
        check=False,
    )
    paths = proc.stdout.split()
    try:
        assert len(paths) == 2, proc.stderr
        # The segment written after the janitor died, and the one the dead
        # janitor was watching, are both unlinked by the replacement.
        assert _gone_eventually(paths)
    finally:
        _unlink_all(paths)
