"""The documentation's promises: its examples run, and every public name is documented.

Every ```python block in docs/**/*.md and README.md runs in a fresh interpreter (with
this session's environment, so its processes and segments are this session's). A block
not meant to run has ``<!-- test: skip -->`` on the line above it; one that needs an
optional package has ``<!-- test: needs MODULE -->`` and is skipped, saying so, where
the package is missing.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import forkref

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_MARKER = re.compile(r"<!--\s*test:\s*(skip|needs)\b\s*([\w.]*)[^>]*-->")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool
    needs: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python fenced blocks of a Markdown file, with their markers."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.search(above)
        blocks.append(
            Block(
                path=path,
                line=start + 1,
                code="\n".join(lines[start + 1 : end]) + "\n",
                skip=bool(marker and marker.group(1) == "skip"),
                needs=marker.group(2) if marker and marker.group(1) == "needs" else None,
            )
        )
        i = end + 1
    return blocks


def markdown_files() -> list[Path]:
    pages = [p for p in DOCS.rglob("*.md") if "_build" not in p.parts]
    return [ROOT / "README.md", *sorted(pages)]


BLOCKS = [block for path in markdown_files() for block in python_blocks(path)]


def test_the_docs_have_examples_to_run() -> None:
    runnable = [b for b in BLOCKS if not b.skip]
    assert len(runnable) >= 10, [b.name for b in BLOCKS]
    assert any(b.path.name == "README.md" for b in runnable)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_example_runs(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip("marked <!-- test: skip -->")
    if block.needs:
        pytest.importorskip(block.needs, reason=f"the example needs {block.needs}")
    script = tmp_path / "example.py"
    script.write_text(block.code)
    with contextlib.ExitStack() as stack:
        if block.needs == "ray":
            # The Ray the example starts is private to it and binds to loopback only,
            # as the Ray tests' own (importing the harness sets Ray's environment).
            import ray_harness

            stack.enter_context(ray_harness.ray_environment())
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    assert done.returncode == 0, (
        f"{block.name} exited with {done.returncode}\n--- stdout\n{done.stdout}"
        f"\n--- stderr\n{done.stderr}"
    )


def test_a_broken_example_fails(tmp_path: Path) -> None:
    """The runner sees a failing block: an assert that fails exits non-zero."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nassert 1 + 1 == 3\n```\n")
    [block] = python_blocks(page)
    script = tmp_path / "example.py"
    script.write_text(block.code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, check=False)
    assert done.returncode != 0


def test_markers_are_read(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- test: skip (needs a cluster) -->\n```python\nx\n```\n\n"
        "<!-- test: needs ray -->\n\n```python\ny\n```\n\n```python\nz\n```\n"
    )
    skipped, needs_ray, plain = python_blocks(page)
    assert (skipped.skip, skipped.needs) == (True, None)
    assert (needs_ray.skip, needs_ray.needs) == (False, "ray")
    assert (plain.skip, plain.needs, plain.code) == (False, None, "z\n")


_AUTODOC = re.compile(r"^\.\. auto(?:function|class|exception|data)::\s+forkref\.(\w+)\s*$", re.M)


def test_every_public_name_has_an_api_entry() -> None:
    documented = set(_AUTODOC.findall((DOCS / "api.md").read_text()))
    assert documented == set(forkref.__all__), (
        f"missing from docs/api.md: {sorted(set(forkref.__all__) - documented)}; "
        f"not public: {sorted(documented - set(forkref.__all__))}"
    )


def test_every_exception_has_its_cause_and_fix() -> None:
    api = (DOCS / "api.md").read_text()
    exceptions = [
        name
        for name in forkref.__all__
        if isinstance(getattr(forkref, name), type)
        and issubclass(getattr(forkref, name), BaseException)
        and name != "Error"
    ]
    rows = set(re.findall(r"^\| \{class\}`~forkref\.(\w+)` \|[^|]+\|[^|]+\|$", api, re.M))
    assert set(exceptions) <= rows, sorted(set(exceptions) - rows)
