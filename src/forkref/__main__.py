"""``python -m forkref``: the same as the ``forkref`` command."""

import sys

from forkref._tools.cli import main

sys.exit(main())
