"""``python -m flamingo_vlm``: the ``flamingo-vlm`` command."""

import sys

from .cli import run

sys.exit(run())
