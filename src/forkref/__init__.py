"""forkref: hand big objects to process-pool workers by reference, not by pickle.

``share(obj)`` returns a handle whose pickled form is a ~170-byte reference;
unpickled in a forked worker that holds the object (forked after the share,
or alive when it forked), it is the original object.
The documentation (docs/, built by ``make docs``) has the guide, the limits and the
API reference.
"""

from forkref._errors import (
    BrokenPoolError,
    CompactError,
    Error,
    ForkError,
    ForkWarning,
    MemoryAccessError,
    MemoryReportError,
    NotInheritedError,
    PerformanceWarning,
    ReleasedError,
    ResultPicklingError,
    SharedMemoryError,
    SharedMemoryFullError,
    TaskPicklingError,
    TaskTimeoutError,
    WorkerDiedError,
)
from forkref._fork.hygiene import fork_hygiene
from forkref._launchers.ray.memory import ObjectStoreUse, RayMemoryReport
from forkref._memory.attrs import compact_attrs
from forkref._memory.compact import CompactList, compact
from forkref._memory.compactdict import CompactDict, compact_dict
from forkref._memory.report import MemoryReport, MemorySampler, ProcessMemory, memory_report
from forkref._pools.executor import ProcessPoolExecutor
from forkref._pools.explain import Explanation, explain
from forkref._pools.pool import Pool
from forkref._share.handle import Shared, share
from forkref._shm.export import ResultToken, export_result, import_result
from forkref._version import __version__ as __version__

__all__ = [
    "BrokenPoolError",
    "CompactDict",
    "CompactError",
    "CompactList",
    "Error",
    "Explanation",
    "ForkError",
    "ForkWarning",
    "MemoryAccessError",
    "MemoryReport",
    "MemoryReportError",
    "MemorySampler",
    "NotInheritedError",
    "ObjectStoreUse",
    "PerformanceWarning",
    "Pool",
    "ProcessMemory",
    "ProcessPoolExecutor",
    "RayMemoryReport",
    "ReleasedError",
    "ResultPicklingError",
    "ResultToken",
    "Shared",
    "SharedMemoryError",
    "SharedMemoryFullError",
    "TaskPicklingError",
    "TaskTimeoutError",
    "WorkerDiedError",
    "compact",
    "compact_attrs",
    "compact_dict",
    "explain",
    "export_result",
    "fork_hygiene",
    "import_result",
    "memory_report",
    "share",
]
