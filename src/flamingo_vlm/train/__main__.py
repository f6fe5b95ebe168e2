"""``python -m flamingo_vlm.train --config train.yaml`` (what ``torchrun -m`` launches)."""

import sys

from ..allocator import start
from ..lifetime import die_with_launcher

die_with_launcher()  # under torchrun: dies with it, even of kill -9 (flamingo_vlm.lifetime)
start("flamingo_vlm.train")  # tcmalloc where installed (flamingo_vlm.allocator), as the flamingo-vlm command

from .cli import main  # noqa: E402

sys.exit(main())
