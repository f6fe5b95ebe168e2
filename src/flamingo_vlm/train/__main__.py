"""``python -m flamingo_vlm.train --config train.yaml`` (what ``torchrun -m`` launches)."""

import sys

from .cli import main

sys.exit(main())
