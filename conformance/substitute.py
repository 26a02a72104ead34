"""Put forkref's pools where CPython's tests look for the stdlib's.

* suite ``cf``: ``concurrent.futures.ProcessPoolExecutor`` and
  ``concurrent.futures.process.ProcessPoolExecutor`` become
  ``forkref.ProcessPoolExecutor``. This must happen before
  ``test.test_concurrent_futures.util`` is imported: its mixins read
  ``futures.ProcessPoolExecutor`` when their classes are created.
* suite ``mp``: ``multiprocessing.pool.Pool`` becomes ``forkref.Pool``. Every
  ``multiprocessing.Pool(...)`` and ``ctx.Pool(...)`` imports it from there
  at call time and passes ``context=`` the context in use, so the start method
  the test module set reaches forkref. The manager's server-side Pool and
  ``multiprocessing.dummy`` keep the stdlib classes they bound at import.

Some tests start a fresh interpreter (``script_helper.assert_python_ok``) that
imports the stdlib class itself, often with ``-I``, which ignores PYTHONPATH.
:func:`wrap_script_helper` prefixes such a child's code with the same
substitution, so those tests exercise forkref too.

Target ``stdlib`` substitutes nothing: the runner's self-check, which must
pass every selected test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["install", "prelude", "wrap_script_helper"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(suite: str, target: str) -> None:
    """Substitute forkref's pool for the stdlib's in this process."""
    if target == "stdlib":
        return
    import forkref

    if suite == "cf":
        import concurrent.futures
        import concurrent.futures.process

        concurrent.futures.ProcessPoolExecutor = forkref.ProcessPoolExecutor  # type: ignore[misc, assignment]
        concurrent.futures.process.ProcessPoolExecutor = forkref.ProcessPoolExecutor  # type: ignore[misc, assignment]
    elif suite == "mp":
        import multiprocessing.pool

        multiprocessing.pool.Pool = forkref.Pool  # type: ignore[misc, assignment]
    else:
        raise ValueError(f"unknown suite {suite!r}")


def prelude(suite: str, target: str) -> str:
    """Python source that makes a fresh interpreter call :func:`install`."""
    return (
        f"import sys; sys.path.insert(0, {REPO!r}); "
        f"from conformance.substitute import install; install({suite!r}, {target!r})\n"
    )


def _rewrite(args: tuple[str, ...], code_prefix: str) -> tuple[str, ...]:
    """The interpreter arguments with ``code_prefix`` run before the program."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "-c" and i + 1 < len(out):
            out[i + 1] = code_prefix + out[i + 1]
            return tuple(out)
        if not arg.startswith("-"):  # a script path: run it from -c, as __main__
            run = f"import runpy; runpy.run_path({arg!r}, run_name='__main__')\n"
            return (*out[:i], "-c", code_prefix + run, *out[i + 1 :])
    return tuple(out)


def wrap_script_helper(suite: str, target: str) -> None:
    """Make ``assert_python_ok``/``assert_python_failure`` children substitute too."""
    if target == "stdlib":
        return
    from test.support import script_helper  # type: ignore[import-not-found]

    original: Callable[..., Any] = script_helper.run_python_until_end
    code_prefix = prelude(suite, target)

    def run_python_until_end(*args: str, **env_vars: Any) -> Any:
        return original(*_rewrite(args, code_prefix), **env_vars)

    # assert_python_ok and _failure look this name up in the module at call time.
    script_helper.run_python_until_end = run_python_until_end
