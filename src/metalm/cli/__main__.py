"""`python -m metalm.cli ...`: runs the CLI and exits with its code."""

import sys

from metalm.cli import main

if __name__ == "__main__":
    sys.exit(main())
