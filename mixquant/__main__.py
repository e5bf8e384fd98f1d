"""`python -m mixquant`: the command line."""

import sys

from mixquant.cli import main

sys.exit(main())
