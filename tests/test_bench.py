"""forkref bench in tiny configurations: the JSON schema, every answer verified, and the
ways a run can go wrong (a WRONG answer, a timeout, a missing package, a bad option)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkref._tools.bench.catalog import load
from forkref._tools.bench.registry import METHODS, Run, implements, method
from forkref._tools.cli import main

pytestmark = pytest.mark.usefixtures("private_tmpdir")

TINY = [
    "--size", "2MiB", "--items", "4000", "--late-iters", "2", "--result-size", "1MiB",
    "--tiny", "500", "--no-progress",
]  # fmt: skip
FORK_METHODS = "pickled,global,share-stdlib,forkref,forkref-auto"
RESULT_KEYS = {
    "workload", "method", "label", "status", "reason", "seconds", "seconds_full", "tasks_run",
    "tasks", "ratio", "workers", "verified", "scaled",
}  # fmt: skip


def _bench(*args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "forkref", "bench", *TINY, "--json", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.smoke
def test_every_workload_with_the_fork_methods_is_verified() -> None:
    code, report = _bench("--methods", FORK_METHODS)
    assert code == 0
    assert report["schema"] == 1
    assert report["command"].startswith("forkref bench --size 2MiB")
    assert report["config"]["workers"] == 2
    assert report["config"]["pickled_tasks"] == 4
    assert report["machine"]["cores"] == os.cpu_count()
    assert report["versions"]["forkref"]
    names = [w["name"] for w in report["workloads"]]
    assert names == ["frame", "dicts", "late", "result", "tiny"]
    results = report["results"]
    assert len(results) == 5 * 5
    ran = [r for r in results if r["status"] != "n/a"]
    assert len(ran) == 20  # the n/a ones: global x2, auto x2, share-stdlib on tiny
    for r in results:
        assert set(r) == RESULT_KEYS
    for r in ran:
        where = f"{r['workload']}/{r['method']}"
        assert r["status"] == "ok", (where, r["reason"])
        assert r["verified"] is True, (where, r["reason"])
        assert r["seconds"] > 0, where
        assert r["seconds_full"] >= r["seconds"], where
        assert r["ratio"] is not None, where
        assert r["ratio"] > 0, where
        if r["workload"] == "tiny":
            assert r["workers"] == [], where  # no data held: memory means nothing
        else:
            assert 1 <= len(r["workers"]) <= 2 * 3, where  # late: fresh pools per frame
            assert all(w["peak_uss"] > 0 and w["peak_pss"] > 0 for w in r["workers"]), where
    for r in results:
        if r["status"] == "n/a":
            assert r["reason"]
            assert r["seconds"] is None
    reference = [r for r in ran if r["method"] == "forkref"]
    assert all(r["ratio"] == 1.0 for r in reference)
    pickled = [r for r in ran if r["method"] == "pickled" and r["workload"] in ("frame", "dicts")]
    assert all(r["tasks_run"] == 4 and r["tasks"] == 16 and r["scaled"] for r in pickled)


def test_spawn_and_third_party_methods_are_verified_or_skipped_with_the_install() -> None:
    methods = "forkref,forkref-spawn,joblib,mpire,ray-put,ray-pool,forkref-ray"
    code, report = _bench("--workloads", "frame", "--methods", methods)
    assert code == 0
    by_method = {r["method"]: r for r in report["results"]}
    assert by_method["forkref-spawn"]["verified"]
    for name in ("joblib", "mpire", "ray-put", "ray-pool"):
        r = by_method[name]
        installed = report["versions"].get(name.split("-")[0])
        if installed:
            assert r["status"] == "ok", (name, r["reason"])
            assert r["verified"], (name, r["reason"])
        else:
            assert r["status"] == "skipped"
            assert "is not installed (pip install" in r["reason"]
    ray_backend = by_method["forkref-ray"]
    assert ray_backend["status"] in ("ok", "skipped")
    if ray_backend["status"] == "skipped":
        assert "Ray backend" in ray_backend["reason"] or "ray is not installed" in ray_backend[
            "reason"
        ]


# -- in-process runs with contenders made for the test ----------------------------------


@pytest.fixture
def fake_methods() -> Iterator[None]:
    """Register a method that answers wrong and one that hangs; remove them afterwards."""
    load()
    method("wrong", "answers wrong")
    method("hangs", "hangs with a pool")

    @implements("wrong", "frame")
    def _wrong(run: Run) -> Any:
        import multiprocessing as mp

        from forkref._tools.bench.tasks import work_pid

        with mp.get_context("fork").Pool(1) as pool:
            answers = pool.starmap(work_pid, [(run.data, i) for i in range(run.tasks)])
        pid, value = answers[3]
        answers[3] = (pid, value + 1.0)
        return answers

    @implements("hangs", "frame")
    def _hangs(run: Run) -> Any:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(2) as pool:
            pool.map(time.sleep, [3600, 3600])
        return []

    yield
    del METHODS["wrong"], METHODS["hangs"]


def test_a_wrong_answer_is_reported_and_fails_the_exit_code(
    fake_methods: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", *TINY, "--workloads", "frame", "--methods", "forkref,wrong",
                 "--json", str(out)])  # fmt: skip
    assert code == 1
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results["forkref"]["status"] == "ok"
    assert results["wrong"]["status"] == "WRONG"
    assert results["wrong"]["verified"] is False
    assert results["wrong"]["reason"].startswith("task 3: got ")
    table = capsys.readouterr().out
    assert "WRONG" in table
    assert "task 3" in table


def test_timeout_kills_the_run_and_every_process_it_started(fake_methods: None) -> None:
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.monotonic()
    code = main(["bench", *TINY, "--workloads", "frame", "--methods", "hangs",
                 "--timeout", "2", "--json", os.devnull])  # fmt: skip
    assert code == 0  # a timeout is reported, it is not a wrong answer
    assert time.monotonic() - start < 60
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left


def test_timeout_shows_in_the_json(fake_methods: None, capsys: pytest.CaptureFixture[str]) -> None:
    main(["bench", *TINY, "--workloads", "frame", "--methods", "hangs", "--timeout", "1",
          "--json"])  # fmt: skip
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["status"] == "timeout"
    assert "--timeout" in result["reason"]
    assert result["verified"] is False


def test_plot_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    code = main(["bench", *TINY, "--workloads", "frame,tiny", "--methods", "global,forkref",
                 "--json", os.devnull, "--plot", str(png)])  # fmt: skip
    assert code == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # two panels per workload, labels, caption


def test_missing_matplotlib_is_said_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "x.png"
    code = main(["bench", *TINY, "--json", os.devnull, "--plot", str(png)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err
    assert "pip install 'forkref[demo]'" in err
    assert not png.exists()


def test_missing_rich_is_said_unless_json_goes_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main(["bench", *TINY]) == 2
    assert "needs rich" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "lots"], "--size: cannot read size 'lots'"),
        (["--methods", "forkref,nope"], "unknown method nope"),
        (["--workloads", "bogus"], "unknown workload bogus"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--timeout", "0"], "--timeout must be a positive"),
    ],
)
def test_bad_options_are_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--json", os.devnull, *args]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_ends_the_run_and_its_processes(fake_methods: None) -> None:
    import signal

    import psutil

    # Our own handler: the suite also runs with SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # The Ctrl-C comes from another process, not a timer thread: the run forks,
    # and a fork beside a thread is what Python 3.12+ warns about.
    ctrl_c = f"import os, signal, time; time.sleep(1); os.kill({os.getpid()}, signal.SIGINT)"
    killer = subprocess.Popen([sys.executable, "-c", ctrl_c])
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        code = main(["bench", *TINY, "--workloads", "frame", "--methods", "hangs",
                     "--timeout", "60", "--json", os.devnull])  # fmt: skip
    finally:
        killer.kill()
        killer.wait()
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left


def _benchmark_module(name: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_and_the_bench_measure_the_same_data_and_tasks() -> None:
    from forkref._tools.bench import data, tasks

    pools, core = _benchmark_module("bench_pools"), _benchmark_module("bench_core")
    for name in ("build_frame", "build_dicts", "late_frame", "work", "trivial", "parse_size"):
        assert getattr(pools, name) is getattr(data, name), name
    assert core.build_frame is data.build_frame
    assert core.TASKS == pools.TASKS == data.TASKS == 16
    assert tasks.work is data.work  # what every bench method's workers run
