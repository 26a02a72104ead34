"""Shared memory where fork cannot serve: segments, serialization, and the export route.

``segments`` (files in a tmpfs directory), ``serialize`` (an object into one
segment, rebuilt zero-copy), ``export`` (exports and big results), ``store``
(the exports served), ``warm`` (the warm segment store: segments kept for
reuse), ``autoresult`` (big task results back through segments), ``server``
and ``client`` (the export thread and the worker side), ``protocol`` (what they
say to each other). Imports :mod:`forkref._refs` and below.
"""
