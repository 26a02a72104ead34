"""The tools: the command line, ``doctor``, ``demo`` and ``bench``.

The top layer: may import anything below, and nothing imports it but
``forkref.__main__``.
"""
