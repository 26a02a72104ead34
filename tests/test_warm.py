"""The warm segment store: reuse is fast, but never while a reader maps a segment.

In-process tests drive :class:`forkref._shm.warm.WarmStore` with real
segments, real locks and real mappings. The pool tests share objects with
real spawn workers through the export server, releasing and sharing again
many times, with every reader checking a checksum of every object it sees
(and of objects it kept from earlier tasks, whose segments must not be
reused under them).
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pandas as pd
import pytest

import forkref
from conftest import mounted_tmpfs, wait_until
from forkref._errors import SharedMemoryError
from forkref._shm import export as _export
from forkref._shm import serialize, warm

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20


@pytest.fixture
def cap(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv(warm.ENV_CAP, str(64 * MiB))
    return 64 * MiB


def _plan(value: int, nbytes: int) -> serialize.Plan:
    return serialize.plan(np.full(nbytes, value, dtype=np.uint8))


# -- the store, in process ------------------------------------------------------------


def test_a_segment_is_not_reused_while_a_reader_maps_it(cap: int) -> None:
    store = warm.WarmStore()
    a = store.write(_plan(1, MiB), "a")
    reader = warm.map_for_reading(a.ro_fd, a.size, a.generation)
    store.park(a)
    b = store.write(_plan(2, MiB), "b")
    assert b is not a
    assert store.reused == 0
    assert np.all(serialize.rebuild(reader, a.generation) == 1)  # type: ignore[operator]
    reader.close()
    store.park(b)
    used = {a.generation, b.generation}
    c = store.write(_plan(3, MiB), "c")
    assert c in (a, b)
    assert store.reused == 1
    assert c.generation not in used
    c.close()
    store.clear()


def test_a_reader_of_an_earlier_use_is_refused(cap: int) -> None:
    store = warm.WarmStore()
    a = store.write(_plan(1, MiB), "a")
    old_fd, old_generation = os.dup(a.ro_fd), a.generation
    store.park(a)
    b = store.write(_plan(2, MiB), "b")
    assert b is a  # nobody mapped it: reused
    mapping = warm.map_for_reading(old_fd, b.size, old_generation)
    os.close(old_fd)
    with pytest.raises(serialize.SegmentReused, match="released and the segment reused"):
        serialize.rebuild(mapping, old_generation)
    mapping.close()
    b.close()


def test_a_reused_segment_shows_no_byte_of_the_previous_use(cap: int) -> None:
    store = warm.WarmStore()
    a = store.write(_plan(0xAB, 2 * MiB), "a")
    store.park(a)
    # Several buffers of odd lengths: alignment gaps between them.
    small = {f"k{i}": np.ones(MiB // 3 + i * 7, dtype=np.uint8) for i in range(3)}
    b = store.write(serialize.plan(small), "b")
    assert b is a
    pages = -(-b.size // mmap.PAGESIZE) * mmap.PAGESIZE
    seen = mmap.mmap(b.ro_fd, pages, prot=mmap.PROT_READ)
    assert 0xAB not in bytes(seen)  # gaps and the rest of the last page were zeroed
    seen.close()
    b.close()


def test_what_a_worker_maps_cannot_be_made_writable(cap: int) -> None:
    store = warm.WarmStore()
    seg = store.write(_plan(1, MiB), "a")
    mapping = warm.map_for_reading(seg.ro_fd, seg.size, seg.generation)
    with pytest.raises(TypeError):
        mapping[0] = 0
    with pytest.raises(PermissionError):
        mmap.mmap(seg.ro_fd, seg.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
    mapping.close()
    seg.close()


def test_parked_bytes_stay_under_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(warm.ENV_CAP, "3M")
    store = warm.WarmStore()
    segs = [store.write(_plan(i, MiB), str(i)) for i in range(6)]
    for seg in segs:
        store.park(seg)
        assert store.parked_bytes() <= 3 * MiB
    assert store.parked
    store.clear()
    assert all(s.fd < 0 for s in segs)


def test_a_bad_cap_setting_names_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(warm.ENV_CAP, "lots")
    with pytest.raises(SharedMemoryError, match=f"{warm.ENV_CAP}='lots'.*e.g. 4G"):
        warm.WarmStore().write(_plan(1, 4096), "a")
    monkeypatch.setenv(warm.ENV_CAP, "0")
    store = warm.WarmStore()
    seg = store.write(_plan(1, 4096), "a")
    store.park(seg)
    assert not store.parked
    assert seg.fd < 0


def test_idle_segments_are_trimmed(cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm, "IDLE_SECONDS", 0.2)
    store = warm.WarmStore()
    store.park(store.write(_plan(1, MiB), "a"))
    due = store.trim_idle()
    assert due is not None
    assert 0 < due <= 0.2
    assert wait_until(lambda: store.trim_idle() is None and not store.parked, 5)


# -- with spawn workers ----------------------------------------------------------------

_held: list[tuple[Any, str]] = []


def digest(obj: Any) -> str:
    """A checksum of an object's contents (arrays, frames, dicts of arrays)."""
    h = hashlib.blake2b()
    if isinstance(obj, pd.DataFrame):
        for name in obj.columns:
            h.update(np.ascontiguousarray(obj[name].to_numpy()).tobytes())
    elif isinstance(obj, dict):
        for key in sorted(obj):
            h.update(key.encode() + np.ascontiguousarray(obj[key]).tobytes())
    else:
        h.update(np.ascontiguousarray(obj).tobytes())
    return h.hexdigest()


def _check(args: tuple[Any, str]) -> int:
    """Verify this object, and every object kept from earlier tasks (released since)."""
    obj, expected = args
    assert digest(obj) == expected, "an object's bytes changed or belong to another"
    _held.append((obj, expected))
    del _held[:-3]  # keep the last three: their segments must not be reused meanwhile
    for old, want in _held:
        assert digest(old) == want, "a kept object's segment was reused under it"
    return os.getpid()


def _make(i: int, rng: np.random.Generator) -> Any:
    n = int(rng.choice([200_000, 230_000, 260_000, 900_000]))  # similar sizes: reuse
    kind = i % 3
    if kind == 0:
        return rng.integers(0, 2**63, n // 8, dtype=np.uint64)
    if kind == 1:
        return pd.DataFrame({"a": rng.random(n // 16), "b": rng.random(n // 16)})
    return {f"p{j}": rng.integers(0, 255, n // 3 + j, dtype=np.uint8) for j in range(3)}


def test_many_share_release_cycles_never_mix_objects(
    cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm, "IDLE_SECONDS", 3600.0)  # emptied by the pool's end, not idleness
    rng = np.random.default_rng(7)
    with mp.get_context("spawn").Pool(2) as pool:
        for i in range(150):
            obj = _make(i, rng)
            handle = forkref.share(obj)
            pool.map(_check, [(handle, digest(obj))] * 2, chunksize=1)
            handle.release()
        store = _export._server.store.warm  # type: ignore[union-attr]
        assert store.reused > 50, (store.reused, store.created)
    assert wait_until(lambda: not store.parked)  # no worker left: nothing kept


def _size_of(args: tuple[Any, int]) -> int:
    obj, nbytes = args
    assert obj.nbytes == nbytes
    return nbytes


def test_tmpfs_use_stays_within_the_cap_and_ends_at_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(warm, "IDLE_SECONDS", 3600.0)
    with mounted_tmpfs("64m", monkeypatch) as path:
        monkeypatch.setenv(warm.ENV_CAP, "4M")
        rng = np.random.default_rng(3)
        sizes = rng.integers(4096, 2 * MiB, 1000)
        most = 0
        with mp.get_context("spawn").Pool(1) as pool:
            for nbytes in sizes:
                obj = np.ones(int(nbytes), dtype=np.uint8)
                with forkref.share(obj) as handle:
                    assert pool.apply(_size_of, ((handle, int(nbytes)),)) == nbytes
                    most = max(most, _used(path) - warm._capacity(int(nbytes) + 4096))
        assert most <= 4 * MiB, most / MiB
        assert wait_until(lambda: _used(path) == 0)


def _used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


_KILLED_PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, os, signal, sys
    import numpy as np
    import forkref

    def check(args):
        obj, n = args
        return int(obj.nbytes == n)

    if __name__ == "__main__":
        with mp.get_context("spawn").Pool(2) as pool:
            for i in range(20):
                obj = np.ones(300_000 + 1000 * i, dtype=np.uint8)
                with forkref.share(obj) as h:
                    assert pool.map(check, [(h, obj.nbytes)] * 2, chunksize=1) == [1, 1]
            print("warm", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_nothing_is_left_after_the_parent_is_killed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    with mounted_tmpfs("64m", monkeypatch) as path:
        script = tmp_path / "parent.py"
        script.write_text(_KILLED_PARENT)
        env = {**os.environ, warm.ENV_CAP: "16M"}
        out = subprocess.run(
            [sys.executable, str(script)],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == -signal.SIGKILL, out.stderr
        assert "warm" in out.stdout
        assert wait_until(lambda: _used(path) == 0, 60), _used(path)


def test_an_idle_pool_gives_its_parked_segments_back(
    cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm, "IDLE_SECONDS", 0.5)
    with mp.get_context("spawn").Pool(1) as pool:
        obj = np.ones(MiB, dtype=np.uint8)
        with forkref.share(obj) as handle:
            assert pool.apply(_size_of, ((handle, MiB),)) == MiB
        store = _export._server.store.warm  # type: ignore[union-attr]
        # Parked by the release; the pool stays open and idle: the export thread
        # trims it (it parks nothing after 0.5 s on its own).
        assert wait_until(lambda: bool(store.parked))
        assert wait_until(lambda: not store.parked)
        assert pool.apply(_size_of, ((forkref.share(obj), MiB),)) == MiB  # still serves
