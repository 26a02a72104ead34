"""Fork safety: the lowest layer above the errors.

Owns how forkref forks from a process that has threads (the fork lock, pausing
its own threads, the warning about other threads), how forkref's threads stay
out of every other fork of the process (``atfork``), and the gc hygiene that
keeps the parent's pages shared. Imports only :mod:`forkref._errors`,
:mod:`forkref._os` and the stdlib.
"""
