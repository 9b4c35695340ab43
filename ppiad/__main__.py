"""`python -m ppiad <command> ...` = `ppiad <command> ...`."""
import sys

from ppiad.cli import main

if __name__ == "__main__":
    sys.exit(main())
