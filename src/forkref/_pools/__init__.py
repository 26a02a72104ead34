"""The public pools and what goes with them: ``Pool``, ``ProcessPoolExecutor``, progress, explain.

Thin adapters over the engine: they turn the stdlib's APIs into engine calls.
Imports :mod:`forkref._launchers` and below.
"""
