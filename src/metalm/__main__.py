"""`python -m metalm ...`: the CLI (also what `torchrun -m metalm train ...` runs)."""

import sys

from metalm.cli import main

if __name__ == "__main__":
    sys.exit(main())
