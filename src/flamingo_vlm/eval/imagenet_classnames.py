"""The 1000 ImageNet-1k class names in class-index (sorted WordNet id) order: OpenAI CLIP's
curated names, the list OpenFlamingo evaluated with (``IMAGENET_CLASSNAMES`` of open_clip's
``zero_shot_metadata.py`` and OpenFlamingo's ``classification_utils.py``; identical there).

The names are data: ``data/imagenet_classnames.txt``, one per line. Two names occur twice
("missile", "sunglasses"); accuracy compares names, as OpenFlamingo did.
"""

from pathlib import Path

_FILE = Path(__file__).with_name("data") / "imagenet_classnames.txt"
IMAGENET_CLASSNAMES: tuple[str, ...] = tuple(_FILE.read_text(encoding="utf-8").splitlines())

if len(IMAGENET_CLASSNAMES) != 1000:
    raise RuntimeError(f"{_FILE} holds {len(IMAGENET_CLASSNAMES)} class names, not 1000: the package is damaged")
