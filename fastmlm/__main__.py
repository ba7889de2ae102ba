"""``python -m fastmlm``: the fastmlm command (see fastmlm/cli.py)."""
import sys

from .cli import main

sys.exit(main())
