"""`python -m server --model DIR ...`: the same as `molmo serve`."""

import sys

from server.cli import serve

if __name__ == "__main__":
    sys.exit(serve())
