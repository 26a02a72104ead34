"""The pool engine, in named parts.

``model`` (the records every part passes around: Task, Worker, Generation,
Channel), ``scheduler`` (queue, in-flight, worker choice), ``generations``
(forking, retiring, the late-object policy), ``state`` (the settings, parts
and flags the parts below share), ``submission`` (pickling and queueing,
caller threads), ``outcomes`` (completing tasks, breaking), ``workforce``
(what the dispatcher decides each round), ``dispatcher`` (the thread),
``lifecycle`` (close, terminate, the last release), ``introspection`` (pids,
process views, memory), ``engine`` (the facade), ``launcher`` (the interface
a launcher implements), ``worker`` (the loop that runs in a worker), ``wire``
(framing), ``procview`` (workers as ``Process``-like objects). Knows no
concrete launcher: those are in :mod:`forkref._launchers`, above it, which
picks one per pool. Imports :mod:`forkref._share`, :mod:`forkref._shm`,
:mod:`forkref._refs`, :mod:`forkref._memory`, :mod:`forkref._fork` and below.
"""
