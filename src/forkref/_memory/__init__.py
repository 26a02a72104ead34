"""Memory that stays shared: compact containers and memory reports.

Independent of :mod:`forkref._share`; imports :mod:`forkref._shm` and below.
"""
