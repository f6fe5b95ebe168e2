"""``python -m flamingo_vlm.eval`` (and ``torchrun ... -m flamingo_vlm.eval``): the evaluate command."""

from .cli import main

raise SystemExit(main())
