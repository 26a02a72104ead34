"""The pool engine, in named parts.

``model`` (the records every part passes around), ``scheduler`` (queue,
in-flight, worker choice), ``generations`` (forking, retiring, the late-object
policy), ``dispatcher`` (the thread), ``engine`` (the facade), ``launcher`` (the
interface a launcher implements), ``worker`` (the loop that runs in a worker),
``wire`` (framing), ``procview`` (workers as ``Process``-like objects). Knows no
concrete launcher: those are in :mod:`forkref._launchers`, above it.
"""
