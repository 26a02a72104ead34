"""Fork while another cell's thread prints through IOPub: do children hang?

Runs in a real kernel (:mod:`kernel_harness`). One cell starts a thread that
prints without pause (flushing every 50 lines, so IOPub sends all the time);
the next cell then, while it prints:

1. makes ``pools`` ``forkref.Pool(2)`` one after the other (3 forks each: the
   fork server, then 2 workers), each mapping 4 tasks that ``print()``. A
   task first checks, without blocking, that its ``sys.stdout`` lock is free
   (a held one would hang its print forever) and reports it instead of
   printing. Each map must finish within ``timeout`` seconds, or the run
   counts a hung child and stops.
2. makes ``raw_forks`` bare ``os.fork()`` children that only check the same
   lock, without and with :func:`forkref._fork.threads.kernel_stream_locks`
   around the fork: the hazard itself, and forkref's remedy (the part of
   ``fork_safe_stdio`` that keeps locks free; its flush is left out, as it
   would make the fork wait for IOPub to catch up with the printing thread).

Used by tests/test_notebook.py (small counts) and, for the figures in
forkref/threads.py, by ``python benchmarks/fork_while_printing.py``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from kernel_harness import execute, notebook, stream_text

_CHATTER = """
import os, sys, threading, time, multiprocessing, warnings
import forkref
from forkref._fork import threads
stop_chatter = threading.Event()
chatter_lines = 0

def chatter():
    global chatter_lines
    while not stop_chatter.is_set():
        print('chatter', chatter_lines)
        chatter_lines += 1
        if chatter_lines % 50 == 0:
            sys.stdout.flush()

chatter_thread = threading.Thread(target=chatter, name='chatter')
chatter_thread.start()
"""

_FORKS = """
def lock_is_free():
    free = sys.stdout._buffer_lock.acquire(blocking=False)
    if free:
        sys.stdout._buffer_lock.release()
    return free

def task(i):
    if not lock_is_free():
        return 'held'
    print('worker %d task %d' % (os.getpid(), i))  # one write: words of one print may interleave
    return i * i

def raw_forks(n, locked):
    held = 0
    for _ in range(n):
        with threads.kernel_stream_locks() if locked else contextlib.nullcontext():
            pid = os.fork()
        if pid == 0:
            os._exit(0 if lock_is_free() else 3)
        _, status = os.waitpid(pid, 0)
        held += os.waitstatus_to_exitcode(status) == 3
    return held

import contextlib
pools = hung = held = 0
warnings.simplefilter('ignore', forkref.ForkWarning)  # the chatter thread is foreign
for _ in range({pools}):
    pool = forkref.Pool(2)
    try:
        got = pool.map_async(task, range(4), chunksize=1).get(timeout={timeout})
    except multiprocessing.TimeoutError:
        hung += 1
        break
    finally:
        pool.terminate()
        pool.join()
    pools += 1
    held += got.count('held')
    assert [g for g in got if g != 'held'] == [i * i for i in range(4) if got[i] != 'held']
raw_held = raw_forks({raw_forks}, locked=False)
raw_held_locked = raw_forks({raw_forks}, locked=True)
stop_chatter.set()
chatter_thread.join()
sys.stdout.flush()
# One write: the kernel merges late lines of workers into this stream between writes.
sys.stdout.write('RESULT %r\\n' % dict(pools=pools, forks=3 * pools, hung=hung, held=held,
                 raw_forks={raw_forks}, raw_held=raw_held, raw_held_locked=raw_held_locked,
                 chatter_lines=chatter_lines))
"""


@dataclass(frozen=True)
class Measurement:
    """One run.

    Attributes:
        pools: forkref pools whose 4 tasks all finished.
        forks: forks those pools made (fork server and 2 workers each).
        hung: maps that did not finish within the timeout (the run stops at the first).
        held: workers that inherited a held ``sys.stdout`` lock.
        raw_forks: bare ``os.fork()`` children per variant (without, with the locks).
        raw_held: of those without forkref's locks, children that inherited it held.
        raw_held_locked: the same with :func:`forkref._fork.threads.kernel_stream_locks`.
        chatter_lines: lines the printing thread printed meanwhile.
        worker_lines: lines the pools' workers printed that reached the cell.
    """

    pools: int
    forks: int
    hung: int
    held: int
    raw_forks: int
    raw_held: int
    raw_held_locked: int
    chatter_lines: int
    worker_lines: int


def measure(kernel: Any, pools: int, raw_forks: int, timeout: float = 60) -> Measurement:
    """Run the measurement in ``kernel`` (a :class:`kernel_harness.Kernel`)."""
    forks = _FORKS.format(pools=pools, raw_forks=raw_forks, timeout=timeout)
    nb = execute(kernel, notebook([_CHATTER, forks]), timeout=timeout * (pools + 10))
    text = stream_text(nb.cells[1])
    # Written at once, but a worker's late line may land just before it.
    result = re.search(r"RESULT (\{[^}]*\})", text)
    if result is None:
        kinds = [o.get("output_type") for o in nb.cells[1].outputs]
        raise AssertionError(
            f"the cell printed no RESULT line; its outputs: {kinds}; its stdout ends with "
            f"{text[-1500:]!r}; its stderr: {stream_text(nb.cells[1], 'stderr')[-1500:]!r}"
        )
    fields = ast.literal_eval(result.group(1))
    # A worker's line may land inside a chatter line: the streams merge in the cell.
    worker_lines = len(re.findall(r"worker \d+ task \d", text))
    return Measurement(**fields, worker_lines=worker_lines)
