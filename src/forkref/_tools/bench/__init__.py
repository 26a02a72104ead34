"""``forkref bench``: forkref against the other ways, on the user's machine.

Modules: :mod:`.data` (data and task functions, shared with ``benchmarks/``),
:mod:`.tasks` (what workers run), :mod:`.registry` (what a workload and a
method are, and their tables), :mod:`.workloads`, :mod:`.methods` (the
contenders, filling the tables), :mod:`.catalog` (loads both), :mod:`.runner` (a
fresh process per run, checks, memory, timeouts), :mod:`.report` (table,
JSON, chart) and :mod:`.cli` (the ``forkref bench`` command line).

Non-goals: not a statistics package (best of ``--rounds``, no confidence
intervals); not a tuning tool (one pool size, the libraries' defaults).
"""
