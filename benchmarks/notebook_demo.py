"""Run ``notebooks/demo.ipynb`` on a fresh IPython kernel and print its figures.

The README's "In notebooks" figures come from this command: the ``forkref
demo`` comparison (fork) and a spawn map with a notebook-defined function,
both run inside a real kernel, as a notebook user runs them. The kernel runs
this interpreter (needs the ``test`` extra: ipykernel, nbclient) and is killed
with all its processes at the end.

Run: ``python benchmarks/notebook_demo.py`` (1 GiB frame; ``--size 256MiB`` for a
quick run; ``--output run.ipynb`` keeps the executed notebook).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kernel_harness import execute, running_kernel, stream_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="DataFrame size (default 1GiB)")
    parser.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    parser.add_argument("--tasks", type=int, default=8, help="number of tasks (default 8)")
    parser.add_argument("--output", type=Path, help="write the executed notebook here")
    args = parser.parse_args()
    nb = nbformat.read(ROOT / "notebooks" / "demo.ipynb", as_version=4)
    (params,) = [c for c in nb.cells if c.get("id") == "parameters"]
    params.source = f"SIZE = {args.size!r}\nWORKERS = {args.workers}\nTASKS = {args.tasks}"
    with tempfile.TemporaryDirectory() as tmp, running_kernel(Path(tmp)) as kernel:
        execute(kernel, nb, timeout=1800)
    print(f"Python {sys.version.split()[0]}, in an IPython kernel")
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.get("id") != "parameters":
            print(f"\n[{cell.id}]\n{stream_text(cell).rstrip()}")
            if stream_text(cell, "stderr"):
                print(f"[{cell.id} stderr]\n{stream_text(cell, 'stderr').rstrip()}")
    if args.output:
        nbformat.write(nb, args.output)


if __name__ == "__main__":
    main()
