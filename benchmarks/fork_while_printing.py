"""Fork pools in a real IPython kernel while another cell's thread prints: do children hang?

The measurement behind forkref's decision not to warn about an IPython kernel's
own threads (see ``src/forkref/_threads.py``): ``--pools`` ``forkref.Pool(2)``
pools, each mapping 4 printing tasks, while a thread prints through IOPub;
then ``--raw-forks`` bare ``os.fork()`` children without and with forkref's
stream locks, counting those that inherit ``sys.stdout``'s lock held (each
would hang at its first ``print()``). The cells are in
``tests/fork_while_printing.py``; the kernel runs this interpreter and is
killed with all its processes at the end.

Run: ``python benchmarks/fork_while_printing.py --pools 500 --raw-forks 4000``
(needs the ``test`` extra: ipykernel, nbclient); 16 minutes on this project's
shared 2-core machine, most of it spent moving the printed text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fork_while_printing import measure
from kernel_harness import running_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=500, help="forkref pools (3 forks each)")
    parser.add_argument("--raw-forks", type=int, default=4000, help="bare os.fork() per variant")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a map may take")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, running_kernel(Path(tmp)) as kernel:
        m = measure(kernel, args.pools, args.raw_forks, args.timeout)
    print(f"Python {sys.version.split()[0]}; {time.perf_counter() - start:.0f} s")
    print(
        f"forkref pools: {m.pools} pools, {m.forks} forks, {m.hung} hung, "
        f"{m.held} workers inherited a held stdout lock, "
        f"{m.worker_lines} of {4 * m.pools} worker lines reached the cell"
    )
    print(
        f"bare os.fork(): {m.raw_held} of {m.raw_forks} children inherited a held stdout lock; "
        f"with forkref's stream locks: {m.raw_held_locked} of {m.raw_forks}"
    )
    print(f"the printing thread printed {m.chatter_lines:,} lines meanwhile")


if __name__ == "__main__":
    main()
