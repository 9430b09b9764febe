"""`python -m gradverify`: the same entry point as the console script."""

import sys

from gradverify.cli import main

if __name__ == "__main__":
    sys.exit(main())
