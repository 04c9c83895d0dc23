#!/usr/bin/env python
"""Build an EAGLE-3 supervision cache; run it with `accelerate launch` or plain python.

Same parser as `eagle3-cache build`: `python scripts/build_cache.py --help`.
"""

import sys

from builder.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
