"""`python -m bench`: the otabox benchmark (see bench/run.py and bench/RESULTS.md)."""

import sys

from bench.run import main

sys.exit(main())
