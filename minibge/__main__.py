"""`python -m minibge ...`: the same command line as the `minibge` script (see minibge/cli.py)."""
import sys

from .cli import main

sys.exit(main())
