"""The version of forkref: its one source (pyproject.toml reads it, as do ``forkref --version``)."""

__version__ = "0.1.0"
