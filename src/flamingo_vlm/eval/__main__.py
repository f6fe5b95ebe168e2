"""``python -m flamingo_vlm.eval`` (and ``torchrun ... -m flamingo_vlm.eval``): the evaluate command."""

from ..allocator import start
from ..lifetime import die_with_launcher

die_with_launcher()  # under torchrun: dies with it, even of kill -9 (flamingo_vlm.lifetime)
start("flamingo_vlm.eval")  # tcmalloc where installed (flamingo_vlm.allocator), as the flamingo-vlm command

from .cli import entry  # noqa: E402

raise SystemExit(entry())
