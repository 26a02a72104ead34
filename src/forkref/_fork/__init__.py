"""Fork safety: the lowest layer above the errors.

Owns how forkref forks from a process that has threads (the fork lock, pausing
its own threads, the warning about other threads) and the gc hygiene that keeps
the parent's pages shared. Imports only :mod:`forkref._errors` and the stdlib.
"""
