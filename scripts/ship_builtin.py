"""The release step of the built-in model: copy a trained model into the package, in bf16, checking
the 50 MB weights budget (keeps its model card and card.json, which are re-measured with
flamingo_vlm.eval.card). The model card's recipe ends each shipped stage with it.

    python scripts/ship_builtin.py runs/smol-synthetic/final [--name smol-synthetic]
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from flamingo_vlm.files import atomic_directory
from flamingo_vlm.pretrained import WEIGHTS_NAME, from_pretrained
from flamingo_vlm.registry import builtin_model_dir

LIMIT_MB = 50
KEEP = ("README.md", "card.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a trained model directory (flamingo-vlm format)")
    p.add_argument("--name", default="smol-synthetic")
    a = p.parse_args()
    target = builtin_model_dir(a.name)
    if target is None:
        raise SystemExit(f"{a.name!r} is not in flamingo_vlm.registry.BUILTIN_MODELS")
    model, image_processor, tokenizer = from_pretrained(a.source)
    # the model card and its measured figures stay (they are re-measured with flamingo_vlm.eval.card)
    kept = {n: (target / n).read_bytes() for n in KEEP if (target / n).is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        out = model.save_pretrained(Path(tmp) / a.name, tokenizer=tokenizer, image_processor=image_processor,
                                    include_backbones=False, dtype=torch.bfloat16)
        size = (out / WEIGHTS_NAME).stat().st_size / 1e6
        if size > LIMIT_MB:
            raise SystemExit(f"{out / WEIGHTS_NAME} is {size:.1f} MB, over the {LIMIT_MB} MB budget")
        for name, data in kept.items():
            (out / name).write_bytes(data)
        with atomic_directory(target) as staging:
            shutil.copytree(out, staging, dirs_exist_ok=True)
    print(f"shipped {a.source} -> {target} ({size:.1f} MB of weights)")


if __name__ == "__main__":
    main()
