"""CPython's own pool tests run against forkref's pools; ``python -m conformance --help``."""
