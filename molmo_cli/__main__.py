"""`python -m molmo_cli ...`: the `molmo` command (for torchrun and environments without the
console script)."""

import sys

from molmo_cli import main

sys.exit(main())
