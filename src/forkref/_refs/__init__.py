"""What a reference names: the registry of shared objects and the fork records.

A :class:`~forkref._refs.registry.Reference` is the small token a handle pickles
to; the fork records prove that a forked child holds an object. Imports
:mod:`forkref._fork` and below.
"""
