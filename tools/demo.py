"""`python tools/demo.py ...` = `ppiad demo ...`: a thin wrapper over ppiad/cli/demo.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
