"""`python tools/serve.py ...` = `ppiad serve ...`: a thin wrapper over ppiad/cli/serve.py, for a checkout."""
import _path  # noqa: F401  (puts the repository on sys.path)

import sys

from ppiad.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
