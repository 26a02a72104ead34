"""What travels by reference: handles, the automatic-share policy, task pickling.

``handle`` (``share()`` and what a pickled handle becomes), ``autoshare``
(which arguments are big and safe to share), ``taskpickle`` (a task's callables
and big arguments become references). Imports :mod:`forkref._shm` and below.
"""
