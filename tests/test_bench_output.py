"""forkref bench's output in a file or a pipe: plain lines, no redraws, the peers' stderr in a log.

The benchmarked libraries write to stderr from the run's process and from the
processes it starts (joblib's resource tracker warns about "leaked" folders
as a run ends); those lines go to a log file, counted at the end.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from forkref._tools.bench.catalog import load
from forkref._tools.bench.registry import METHODS, Run, implements, method
from forkref._tools.cli import main

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("private_tmpdir")]

TINY = [
    "--size", "2MiB", "--items", "4000", "--late-iters", "2", "--result-size", "1MiB",
    "--tiny", "500", "--workloads", "frame",
]  # fmt: skip


def _noisy_work(data: Any, i: int) -> Any:
    from forkref._tools.bench.tasks import work_pid

    print("UserWarning: noisy peer in a worker", file=sys.stderr, flush=True)
    return work_pid(data, i)


@pytest.fixture
def noisy_method() -> Iterator[None]:
    """A contender that answers right and writes a warning line from its process and its pool."""
    load()
    method("noisy", "writes to stderr")

    @implements("noisy", "frame")
    def _noisy(run: Run) -> Any:
        import multiprocessing as mp

        print("UserWarning: noisy peer in the run", file=sys.stderr, flush=True)
        with mp.get_context("fork").Pool(1) as pool:
            return pool.starmap(_noisy_work, [(run.data, i) for i in range(run.tasks)])

    yield
    del METHODS["noisy"]


def test_output_to_a_pipe_has_plain_lines_and_the_peers_log(
    noisy_method: None, capfd: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", *TINY, "--methods", "forkref,noisy", "--json", os.devnull])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "\r" not in err + out  # no redraws of a live bar
    assert "forkref bench: [1/2] frame: forkref.Pool + share(): ok in " in err
    assert "forkref bench: [2/2] frame: writes to stderr: ok in " in err
    assert "noisy peer" not in err + out  # the peers' lines went to the log
    found = re.search(r"wrote (\d+) line\(s\) to stderr \((\d+) warning\(s\)\), kept in (\S+)", err)
    assert found, err
    lines, warned, path = int(found[1]), int(found[2]), found[3]
    try:
        with open(path) as fh:
            logged = fh.read()
        assert "noisy peer in the run" in logged
        assert "noisy peer in a worker" in logged
        assert lines >= 2
        assert warned >= 2
    finally:
        os.unlink(path)


def test_no_log_is_left_when_the_peers_wrote_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", *TINY, "--methods", "forkref", "--json", os.devnull])
    _, err = capfd.readouterr()
    assert code == 0, err
    assert "kept in" not in err
    assert "forkref bench: [1/1] frame: forkref.Pool + share(): ok in " in err


def test_install_hints_name_forkref_extras() -> None:
    load()
    assert METHODS["ray-put"].needs["ray"] == "pip install 'forkref[ray]'"
    assert METHODS["ray-pool"].needs["ray"] == "pip install 'forkref[ray]'"
    assert METHODS["joblib"].needs["joblib"] == "pip install 'forkref[bench]'"
    assert METHODS["mpire"].needs["mpire"] == "pip install 'forkref[bench]'"
    for m in METHODS.values():
        for hint in m.needs.values():
            assert hint.startswith("pip install 'forkref["), (m.name, hint)
