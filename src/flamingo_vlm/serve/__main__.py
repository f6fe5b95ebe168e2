"""``python -m flamingo_vlm.serve``: the serve command."""

import sys

from ..allocator import start

start("flamingo_vlm.serve")  # tcmalloc where installed (flamingo_vlm.allocator), as the flamingo-vlm command

from .cli import main  # noqa: E402

sys.exit(main())
