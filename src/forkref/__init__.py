"""forkref: hand big objects to process-pool workers by reference, not by pickle.

``share(obj)`` returns a handle whose pickled form is a ~150-byte reference;
unpickled in a worker forked after the share, it is the original object.
See the README for the full story and the limits.
"""

from forkref._errors import Error, NotInheritedError, PerformanceWarning, ReleasedError
from forkref._handle import Shared, share
from forkref._hygiene import fork_hygiene

__all__ = [
    "Error",
    "NotInheritedError",
    "PerformanceWarning",
    "ReleasedError",
    "Shared",
    "fork_hygiene",
    "share",
]

__version__ = "0.1.0"

# Public classes say they live in ``forkref``: stable import paths for
# pickling (a worker re-raising an error unpickles it by this path) and docs.
for _cls in (Error, NotInheritedError, PerformanceWarning, ReleasedError):
    _cls.__module__ = "forkref"
del _cls
