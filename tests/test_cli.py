"""The forkref command line: --version, python -m forkref, plain help, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import forkref
from forkref._tools.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main


def _forkref(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkref", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.smoke
def test_version() -> None:
    done = _forkref("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"forkref {forkref.__version__}"


@pytest.mark.parametrize("command", [[], ["bench"], ["doctor"], ["demo"]])
def test_help_is_plain_text_with_the_exit_codes(command: list[str]) -> None:
    done = _forkref(*command, "--help")
    assert done.returncode == 0
    assert "``" not in done.stdout
    assert ":class:" not in done.stdout
    if not command:
        assert "exit codes: 0 all checks passed; 1 a check failed" in done.stdout
        for name in ("bench", "doctor", "demo"):
            assert name in done.stdout


@pytest.mark.smoke
def test_no_command_is_a_usage_error() -> None:
    done = _forkref()
    assert done.returncode == EXIT_USAGE
    assert "COMMAND" in done.stderr


def test_exit_codes_are_the_documented_ones() -> None:
    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED) == (0, 1, 2, 130)
    assert main.__module__ == "forkref._tools.cli"


def test_demo_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "2MiB", "--tasks", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "pickled argument" in out
    assert "forkref.share()" in out


def test_demo_rejects_a_bad_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "big"]) == EXIT_USAGE
    assert "cannot read size" in capsys.readouterr().err
