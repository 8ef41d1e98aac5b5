"""`python -m braidinfer`: the `braid` command."""
import sys

from braidinfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
