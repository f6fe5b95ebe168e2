#!/usr/bin/env python
"""Run a flamingo-vlm command or script with the perceiver's latents dropped, so that the gated
cross-attention sees only the passed-through cells (a pilot of research/smol-synthetic-history.md,
not a model option).

The model must pass its input tokens through (``flamingo-vlm grow-adapter --media-passthrough``).
``--qk-lr-scale S`` multiplies the learning rate of the cross-attention's query and key/value
projections by S when training.

    python research/cells_only.py train --config research/configs/smol-synthetic-pilot-aim3.yaml
    python research/cells_only.py research/attribute_probe.py --model runs/pilot-aim3/final
"""

from __future__ import annotations

import runpy
import sys


def drop_latents() -> None:
    from flamingo_vlm.modeling import perceiver

    forward = perceiver.PerceiverResampler.forward

    def cells_only(self, x):
        if self.passthrough_norm is None:
            raise RuntimeError("cells_only.py needs a perceiver with media_passthrough")
        return forward(self, x)[:, :, self.latents.shape[0]:]

    perceiver.PerceiverResampler.forward = cells_only


def scale_qk_lr(scale: float) -> None:
    from flamingo_vlm.train import optim

    groups_of = optim.param_groups

    def param_groups(model, cfg):
        out = []
        for g in groups_of(model, cfg):
            fast = [".attn.to_q" in n or ".attn.to_kv" in n for n in g["names"]]
            lr = g.get("lr", cfg.lr)
            for keep, group_lr in ((False, lr), (True, lr * scale)):
                idx = [j for j, f in enumerate(fast) if f == keep]
                if idx:
                    out.append({**g, "params": [g["params"][j] for j in idx],
                                "names": [g["names"][j] for j in idx], "lr": group_lr})
        return out

    optim.param_groups = param_groups


def main() -> int:
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    if "--qk-lr-scale" in args:
        at = args.index("--qk-lr-scale")
        scale_qk_lr(float(args[at + 1]))
        del args[at:at + 2]
    drop_latents()
    if args[0] == "train":
        from flamingo_vlm.train.cli import main as train

        return train(args[1:])
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
