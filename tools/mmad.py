"""`python tools/mmad.py ...` = `ppiad mmad ...`: a thin wrapper over ppiad/cli/mmad.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.mmad import main

if __name__ == "__main__":
    sys.exit(main())
