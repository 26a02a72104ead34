"""Memory that stays shared: compact containers and memory reports.

``layout`` (items by column in flat buffers) and ``columns`` (building one
from a stream), ``compact`` (CompactList) and ``compactdict`` (CompactDict),
``handover`` (their buffers in one segment for other processes), ``attrs``
(compact_attrs: one call for a dataset object), ``report`` (MemoryReport).
Independent of :mod:`forkref._share`; imports :mod:`forkref._shm` and below.
"""
