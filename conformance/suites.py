"""Which CPython tests the conformance run selects, and how it names them.

Two suites, each run under fork, forkserver and spawn:

* ``cf``: ``test.test_concurrent_futures`` modules, the process-pool classes
  only. ``create_executor_tests`` builds one class per start method from a
  mixin with a ``ctx`` attribute; the class whose ``ctx`` is the start method
  under test is selected (``ProcessPoolFork*`` is a prefix of
  ``ProcessPoolForkserver*``, so names are not used). Plain test cases that
  name a start method in the test name (``test_spawn``) go with that method.
* ``mp``: the pool tests of ``test._test_multiprocessing``, taken from the
  per-start-method modules ``test.test_multiprocessing_<method>.test_processes``
  and ``.test_misc`` that CPython itself builds with
  ``install_tests_in_module_dict``.

A test has a *neutral id* that does not depend on the start method, e.g.
``test_process_pool.ProcessPoolExecutorTest.test_traceback`` or
``_test_multiprocessing._TestPool.test_map``: the module and class the test
was written in. Deviations are keyed by it.

Imported by the runner (names only) and by the test process (which imports
the test modules themselves).
"""

from __future__ import annotations

import importlib
import unittest
from collections.abc import Iterator

__all__ = [
    "MP_MISC_TESTS",
    "MP_POOL_CLASSES",
    "START_METHODS",
    "SUITES",
    "collect",
    "modules",
    "neutral_id",
]

START_METHODS = ("fork", "forkserver", "spawn")

CF_MODULES = (
    "test_process_pool",
    "test_wait",
    "test_as_completed",
    "test_shutdown",
    "test_init",
    "test_deadlock",
)
MP_MODULES = ("test_processes", "test_misc")
SUITES = {"cf": CF_MODULES, "mp": MP_MODULES}
SUITE_TITLES = {
    "cf": "test_concurrent_futures, process-pool classes (ProcessPoolExecutor)",
    "mp": "_test_multiprocessing, pool tests (multiprocessing.Pool)",
}

# _test_multiprocessing classes that are about Pool, as written there; the
# runner takes their 'processes' variant (threads and manager variants test
# multiprocessing.dummy and the manager's server-side stdlib Pool).
MP_POOL_CLASSES = ("_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime")

# Plain test cases of _test_multiprocessing that create a Pool (test_misc).
MP_MISC_TESTS = {
    "TestInitializers": ("test_pool_initializer",),
    "TestPoolNotLeakOnFailure": ("test_release_unused_processes",),
    "MiscTestCase": ("test_large_pool",),
    "TestStdinBadfiledescriptor": ("test_pool_in_process",),
}


def modules(suite: str, method: str) -> list[str]:
    """Dotted names of the test modules of ``suite`` for start method ``method``."""
    if suite == "cf":
        return [f"test.test_concurrent_futures.{name}" for name in CF_MODULES]
    return [f"test.test_multiprocessing_{method}.{name}" for name in MP_MODULES]


def neutral_id(test: unittest.TestCase) -> str:
    """``<module>.<class>.<test>`` of the class the test was written in."""
    cls = type(test)
    # Generated classes put the written class first among their bases:
    # type(name, (mixin, executor_mixin, BaseTestCase)) in test_concurrent_futures,
    # Temp(base, Mixin, TestCase) and Temp(base, object) in _test_multiprocessing.
    base = cls.__bases__[0]
    if base in (unittest.TestCase, object):
        base = cls
    module = base.__module__.rsplit(".", 1)[-1]
    return f"{module}.{base.__name__}.{test._testMethodName}"


def _flatten(suite: unittest.TestSuite | unittest.TestCase) -> Iterator[unittest.TestCase]:
    if isinstance(suite, unittest.TestCase):
        yield suite
        return
    for item in suite:
        yield from _flatten(item)


def _selected(suite: str, method: str, test: unittest.TestCase) -> bool:
    cls = type(test)
    name = test._testMethodName
    if suite == "cf":
        ctx = getattr(cls, "ctx", None)
        if ctx is not None:
            return bool(ctx == method)
        # FailingInitializerResourcesTest: test_spawn, test_forkserver; no thread pools.
        return name == f"test_{method}" and "Thread" not in cls.__name__
    base = cls.__bases__[0].__name__
    if base in MP_POOL_CLASSES:
        return getattr(cls, "TYPE", None) == "processes"
    return name in MP_MISC_TESTS.get(base, ())


def collect(suite: str, method: str, module_name: str) -> list[unittest.TestCase]:
    """Import ``module_name`` and return its selected tests, in definition order."""
    module = importlib.import_module(module_name)
    loaded = unittest.defaultTestLoader.loadTestsFromModule(module)
    return [test for test in _flatten(loaded) if _selected(suite, method, test)]
