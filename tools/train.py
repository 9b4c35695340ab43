"""`python tools/train.py ...` = `ppiad train ...`: a thin wrapper over ppiad/cli/train.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
