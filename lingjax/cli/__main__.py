"""`python -m lingjax.cli`: the `lingjax` command (lingjax/cli/__init__.py's main)."""
import sys

from lingjax.cli import main

sys.exit(main())
