"""`python tools/eval.py ...` = `ppiad eval ...`: a thin wrapper over ppiad/cli/eval.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
