"""``flamingo-vlm grow-adapter``: copy a saved model with a grown adapter, keeping every trained weight,
so that training can continue from it instead of starting over (a step of the built-in model's recipe).

    flamingo-vlm grow-adapter smol-synthetic runs/aim2-init \\
        --color-encoding both --media-passthrough
    flamingo-vlm grow-adapter runs/x/final runs/y-init --num-latents 64

``--num-latents`` (a multiple of the current count) repeats each trained latent and nudges the
copies apart with a little noise: the LM's cross-attention averages over latents, so exact copies
leave its output as it was (the perceiver's own attention, whose keys include the latents, shifts a
little) but get the same gradients forever; the noise lets them specialise. ``--color-encoding``
only changes the built-in vision encoder's fixed codes (they have no weights), see
``FeatureGridEncoder``. ``--media-passthrough`` makes the perceiver output its (normed) input tokens
after the latents (``PerceiverResampler(media_passthrough=True)``; what ``aim:`` training needs);
the new LayerNorm starts as a fresh one does. None of these are in OpenFlamingo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

from ..modeling.config import COLOR_MODES

if TYPE_CHECKING:
    import torch

# Every `flamingo-vlm` command, --help included, builds this subcommand's parser, so this module
# imports neither torch (seconds on a small CPU: imported where it is used) nor ..pretrained
# (transformers; tests check the two names agree).
WEIGHTS_NAME = "model.safetensors"

LATENTS = "perceiver.latents"
PASSTHROUGH_NORM = "perceiver.passthrough_norm"


class GrowError(ValueError):
    """The request cannot be done as asked (the source, the target or an option); says what to do."""


def grow_latents(latents: torch.Tensor, num_latents: int, noise: float, seed: int) -> torch.Tensor:
    """``(num_latents, D)``: each of the ``L`` rows repeated ``num_latents // L`` times in a row, the
    repeats moved by ``noise`` times the rows' RMS (the first copy of each is kept exactly)."""
    import torch

    n, _ = latents.shape
    if num_latents % n:
        raise ValueError(f"--num-latents {num_latents} is not a multiple of the current {n} latents")
    grown = latents.float().repeat_interleave(num_latents // n, dim=0)
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.randn(grown.shape, generator=gen) * noise * grown.pow(2).mean().sqrt()
    jitter[:: num_latents // n] = 0
    return (grown + jitter).to(latents.dtype)


def grow_adapter(source: str | os.PathLike, target: str | os.PathLike, *, num_latents: int | None = None,
                 color_encoding: str | None = None, media_passthrough: bool = False, noise: float = 0.05,
                 seed: int = 0) -> Path:
    """Write ``source`` (a saved model directory, or a built-in model's name) grown as asked to the new directory ``target``
    (atomically: nothing is left behind on an error). Returns ``target``."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..files import atomic_directory

    from ..registry import model_source

    # a built-in model by its name, as every other command takes it (its folder inside the package)
    found = model_source(source)
    source, target = found.path if found.kind in ("directory", "builtin") else Path(source), Path(target)
    if num_latents is None and color_encoding is None and not media_passthrough:  # (it wrote a plain copy)
        raise GrowError("nothing to grow: give --num-latents, --color-encoding or --media-passthrough")
    config_path, weights_path = source / "config.json", source / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise GrowError(f"{source} is not a saved model: it needs config.json and {WEIGHTS_NAME}")
    if target.exists():
        raise GrowError(f"{target} exists; pick a new directory")
    config = json.loads(config_path.read_text())
    if color_encoding is not None and config.get("vision_encoder", {}).get("type") != "reference":
        raise GrowError("--color-encoding needs a built-in feature-grid vision encoder")
    perceiver = config.get("perceiver_kwargs", {})
    if ((num_latents is None or num_latents == perceiver.get("num_latents"))
            and (color_encoding is None or color_encoding == config.get("vision_encoder", {}).get("color_encoding"))
            and (not media_passthrough or perceiver.get("media_passthrough"))):
        raise GrowError(f"{source} has that already ({perceiver.get('num_latents')} latents, colour code "
                        f"{config.get('vision_encoder', {}).get('color_encoding')!r}, input tokens passed through: "
                        f"{bool(perceiver.get('media_passthrough'))}): nothing to grow")
    weights = load_file(weights_path)
    if num_latents is not None:
        weights[LATENTS] = grow_latents(weights[LATENTS], num_latents, noise, seed)
        config["perceiver_kwargs"]["num_latents"] = num_latents
    if color_encoding is not None:
        config["vision_encoder"]["color_encoding"] = color_encoding
    if media_passthrough and not config["perceiver_kwargs"].get("media_passthrough"):
        fresh = torch.nn.LayerNorm(weights[LATENTS].shape[1]).state_dict()
        weights.update({f"{PASSTHROUGH_NORM}.{k}": v.to(weights[LATENTS].dtype) for k, v in fresh.items()})
        config["perceiver_kwargs"]["media_passthrough"] = True
    with atomic_directory(target) as staging:
        for item in source.iterdir():  # tokenizer, added token rows, embedded backbones
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            elif item.name not in ("config.json", WEIGHTS_NAME):
                shutil.copy2(item, staging / item.name)
        save_file(weights, staging / WEIGHTS_NAME, metadata={"format": "flamingo-vlm"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="a saved model directory (flamingo-vlm format)")
    p.add_argument("target", type=Path, help="where to write the grown copy (must not exist)")
    p.add_argument("--num-latents", type=int, help="new perceiver latent count (a multiple of the current)")
    p.add_argument("--color-encoding", choices=COLOR_MODES, help="new colour code mode")
    p.add_argument("--media-passthrough", action="store_true",
                   help="also pass the perceiver's input tokens (normed) to the cross-attention")
    p.add_argument("--noise", type=float, default=0.05, help="copies' jitter, relative to the latents' RMS")
    p.add_argument("--seed", type=int, default=0)


def _grow(a: argparse.Namespace) -> int:
    out = grow_adapter(a.source, a.target, num_latents=a.num_latents, color_encoding=a.color_encoding,
                       media_passthrough=a.media_passthrough, noise=a.noise, seed=a.seed)
    config = json.loads((out / "config.json").read_text())
    print(f"{a.source} -> {out}: {config['perceiver_kwargs'].get('num_latents')} latents, "
          f"colour code {config.get('vision_encoder', {}).get('color_encoding')!r}, "
          f"input tokens passed through: {bool(config['perceiver_kwargs'].get('media_passthrough'))}")
    return 0


def _run(a: argparse.Namespace) -> int:
    try:
        return _grow(a)
    except ValueError as e:
        raise SystemExit(f"grow-adapter: {e}") from None


def add_grow_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``grow-adapter`` on the ``flamingo-vlm`` parser's subparsers."""
    p = subparsers.add_parser("grow-adapter", help="copy a saved model with a grown adapter (more latents, "
                              "colour codes, input tokens passed through), keeping its trained weights",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m flamingo_vlm.train.grow``: bad requests exit with the parser's usage error."""
    p = argparse.ArgumentParser(prog="python -m flamingo_vlm.train.grow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    a = p.parse_args(argv)
    try:
        return _grow(a)
    except GrowError as e:
        p.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
