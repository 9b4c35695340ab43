"""`python tools/export.py ...` = `ppiad export ...`: a thin wrapper over ppiad/cli/export.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
