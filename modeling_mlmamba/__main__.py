"""`python -m modeling_mlmamba ...` is the `mlmamba` command (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
