"""Everything the bench can run: the workloads and the contenders, gathered.

:mod:`.registry` says what a workload and a method are and holds their two
tables; :mod:`.workloads` and :mod:`.methods` fill them as they are imported.
This module imports those two, so the registry never imports the modules that
fill it, and code that needs the full tables calls :func:`load` first.
"""

from __future__ import annotations

__all__ = ["load"]


def load() -> None:
    """Fill both tables of :mod:`.registry` (each module registers on import). Idempotent."""
    # Imported here, not at the top: `forkref --help` builds the bench's parser
    # without paying for what the contenders import.
    import forkref._tools.bench.methods
    import forkref._tools.bench.workloads  # noqa: F401
