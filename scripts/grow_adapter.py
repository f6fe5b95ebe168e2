#!/usr/bin/env python
"""Copy a saved flamingo-vlm model with a wider perceiver, another colour encoding and/or the
perceiver's input tokens passed through to the cross-attention, keeping every trained weight, so
that training can continue from it instead of starting over.

    python scripts/grow_adapter.py src/flamingo_vlm/models/smol-synthetic runs/stage10-init \\
        --num-latents 64 --color-encoding both

``--num-latents`` (a multiple of the current count) repeats each trained latent and nudges the
copies apart with a little noise: the LM's cross-attention averages over latents, so exact copies
leave its output as it was (the perceiver's own attention, whose keys include the latents, shifts a
little) but get the same gradients forever; the noise lets them specialise. ``--color-encoding``
only changes the vision encoder's fixed codes (they have no weights), see ``FeatureGridEncoder``.
``--media-passthrough`` makes the perceiver output its (normed) input tokens after the latents
(``PerceiverResampler(media_passthrough=True)``); the new LayerNorm starts as a fresh one does.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flamingo_vlm.modeling.vision import FeatureGridEncoder
from flamingo_vlm.pretrained import WEIGHTS_NAME, atomic_directory

LATENTS = "perceiver.latents"
PASSTHROUGH_NORM = "perceiver.passthrough_norm"


def grow_latents(latents: torch.Tensor, num_latents: int, noise: float, seed: int) -> torch.Tensor:
    """``(num_latents, D)``: each of the ``L`` rows repeated ``num_latents // L`` times in a row, the
    repeats moved by ``noise`` times the rows' RMS (the first copy of each is kept exactly)."""
    n, _ = latents.shape
    if num_latents % n:
        raise ValueError(f"--num-latents {num_latents} is not a multiple of the current {n} latents")
    grown = latents.float().repeat_interleave(num_latents // n, dim=0)
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.randn(grown.shape, generator=gen) * noise * grown.pow(2).mean().sqrt()
    jitter[:: num_latents // n] = 0
    return (grown + jitter).to(latents.dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a saved model directory (flamingo-vlm format)")
    p.add_argument("target", type=Path, help="where to write the grown copy (must not exist)")
    p.add_argument("--num-latents", type=int, help="new perceiver latent count (a multiple of the current)")
    p.add_argument("--color-encoding", choices=FeatureGridEncoder.COLOR_MODES, help="new colour code mode")
    p.add_argument("--media-passthrough", action="store_true",
                   help="also pass the perceiver's input tokens (normed) to the cross-attention")
    p.add_argument("--noise", type=float, default=0.05, help="copies' jitter, relative to the latents' RMS")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    config_path, weights_path = a.source / "config.json", a.source / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        p.error(f"{a.source} is not a saved model: it needs config.json and {WEIGHTS_NAME}")
    if a.target.exists():
        p.error(f"{a.target} exists; pick a new directory")
    config = json.loads(config_path.read_text())
    weights = load_file(weights_path)
    if a.num_latents is not None:
        weights[LATENTS] = grow_latents(weights[LATENTS], a.num_latents, a.noise, a.seed)
        config["perceiver_kwargs"]["num_latents"] = a.num_latents
    if a.color_encoding is not None:
        if config.get("vision_encoder", {}).get("type") != "reference":
            p.error("--color-encoding needs a built-in feature-grid vision encoder")
        config["vision_encoder"]["color_encoding"] = a.color_encoding
    if a.media_passthrough and not config["perceiver_kwargs"].get("media_passthrough"):
        fresh = torch.nn.LayerNorm(weights[LATENTS].shape[1]).state_dict()
        weights.update({f"{PASSTHROUGH_NORM}.{k}": v.to(weights[LATENTS].dtype) for k, v in fresh.items()})
        config["perceiver_kwargs"]["media_passthrough"] = True
    with atomic_directory(a.target) as staging:
        for item in a.source.iterdir():  # tokenizer, added token rows, embedded backbones
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            elif item.name not in ("config.json", WEIGHTS_NAME):
                shutil.copy2(item, staging / item.name)
        save_file(weights, staging / WEIGHTS_NAME, metadata={"format": "flamingo-vlm"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{a.source} -> {a.target}: {weights[LATENTS].shape[0]} latents, "
          f"colour code {config.get('vision_encoder', {}).get('color_encoding')!r}, "
          f"input tokens passed through: {bool(config['perceiver_kwargs'].get('media_passthrough'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
