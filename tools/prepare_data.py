"""`python tools/prepare_data.py ...` = `ppiad prepare-data ...`: a thin wrapper over ppiad/cli/prepare_data.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
