"""`python -m shoal ...`: the `shoal` command without its console script (e.g. from a source tree)."""

import sys

from shoal.cli import main

sys.exit(main())
