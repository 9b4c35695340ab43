"""`python tools/infer.py ...` = `ppiad infer ...`: a thin wrapper over ppiad/cli/infer.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
