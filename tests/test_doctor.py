"""forkref doctor: the facts, a verdict per capability with its fix, text and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from forkref._tools.doctor import diagnose, render


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkref", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _verdict(data: dict[str, Any], capability: str) -> dict[str, Any]:
    return next(v for v in data["verdicts"] if v["capability"] == capability)


def test_text_names_every_fact_and_verdict() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for label in (
        "Python",
        "Start methods",
        "Shared memory",
        "Huge pages",
        "Threads",
        "Packages",
        "Notebook",
        "Verdicts",
    ):
        assert f"\n{label}" in text, label
    for capability in ("fork inheritance", "shared memory", "compact containers", "Ray backend"):
        assert f"{capability}: " in text
    assert "OK          fork inheritance" in text
    assert "``" not in text  # plain words, no markup


@pytest.mark.smoke
def test_json_has_the_facts_and_the_verdicts() -> None:
    done = _run("--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    facts = data["facts"]
    assert facts["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert "fork" in facts["start_methods"]["available"]
    assert facts["start_methods"]["default"] in facts["start_methods"]["available"]
    assert facts["shared_memory"]["directory"]
    assert facts["shared_memory"]["free_bytes"] > 0
    assert set(facts["huge_pages"]) == {"anonymous", "shmem", "defrag", "notes"}
    assert facts["threads"]["python"] == ["MainThread"]
    assert facts["packages"]["psutil"]
    assert facts["packages"]["tqdm"]
    assert facts["notebook"]["notebook"] is False
    assert [v["capability"] for v in data["verdicts"]] == [
        "fork inheritance",
        "shared memory",
        "compact containers",
        "Ray backend",
    ]
    assert _verdict(data, "fork inheritance")["status"] == "ok"
    assert _verdict(data, "compact containers")["status"] == "ok"
    assert data["exit_code"] == 0


def test_ray_backend_verdict_says_why_and_how() -> None:
    ray = _verdict(diagnose().as_dict(), "Ray backend")
    assert ray["status"] in ("ok", "unavailable")
    if ray["status"] == "unavailable":
        assert ray["fix"]
        assert "backend" in ray["detail"] or "ray is not installed" in ray["detail"]


def test_unusable_segment_directory_fails_with_the_fix(tmp_path: Any) -> None:
    missing = str(tmp_path / "no-such-dir")
    done = _run("--json", env={"FORKREF_SHM_DIR": missing})
    assert done.returncode == 1
    data = json.loads(done.stdout)
    shm = _verdict(data, "shared memory")
    assert shm["status"] == "fail"
    assert missing in shm["detail"]
    assert "FORKREF_SHM_DIR" in shm["fix"]
    assert data["facts"]["shared_memory"]["from_environment"] is True


def test_small_shared_memory_warns_like_docker(small_tmpfs: str) -> None:
    diagnosis = diagnose()
    shm = next(v for v in diagnosis.verdicts if v.capability == "shared memory")
    assert shm.status == "warn"
    assert "64 MB" in shm.detail
    assert shm.fix is not None
    assert "--shm-size" in shm.fix
    assert diagnosis.exit_code == 0  # works, with a caveat
    assert "fix: Docker: run with --shm-size" in render(diagnosis)


def test_other_threads_are_reported_with_a_warning() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="someone-elses-thread")
    worker.start()
    try:
        diagnosis = diagnose()
    finally:
        stop.set()
        worker.join()
    assert "someone-elses-thread" in diagnosis.facts["threads"]["python"]
    fork = diagnosis.verdicts[0]
    assert fork.status == "warn"
    assert "someone-elses-thread" in fork.detail
    assert fork.fix is not None


@pytest.mark.parametrize("mode", ["always", "madvise"])
def test_huge_page_modes_are_explained(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    from forkref._tools import doctor as _doctor

    def read_mode(path: str) -> str | None:
        return mode if path.endswith("/enabled") else None

    monkeypatch.setattr(_doctor, "_read_mode", read_mode)
    facts = _doctor._huge_pages()
    assert facts["anonymous"] == mode
    assert any(("2 MiB" if mode == "always" else "4 KiB") in n for n in facts["notes"])
    fork = _doctor.diagnose().verdicts[0]
    assert fork.status == ("warn" if mode == "always" else "ok")
    if mode == "always":
        assert fork.fix is not None
        assert "madvise" in fork.fix


def test_huge_page_facts_read_the_machine_and_say_what_fork_costs() -> None:
    from forkref._tools import doctor as _doctor

    thp = "/sys/kernel/mm/transparent_hugepage"
    if not os.path.exists(f"{thp}/defrag"):
        pytest.skip("no transparent huge pages on this kernel")
    with open(f"{thp}/defrag") as fh:
        text = fh.read()
    facts = _doctor._huge_pages()
    assert facts["defrag"] == text[text.index("[") + 1 : text.index("]")]
    assert any(n.startswith(f"defrag: {facts['defrag']}") for n in facts["notes"])
    if facts["anonymous"] in ("madvise", "never"):
        assert any("page tables per GiB" in n for n in facts["notes"])
    assert f"defrag: {facts['defrag']}" in _doctor.render(_doctor.diagnose())
