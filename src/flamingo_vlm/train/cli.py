"""``flamingo-vlm train``: train from a YAML config; flags override it.

    flamingo-vlm train --config configs/train.yaml
    flamingo-vlm train --config configs/train.yaml --max-steps 100 --lr 5e-5 --set schedule.kind=cosine
    torchrun --nproc_per_node 2 -m flamingo_vlm.train --config configs/train.yaml --distributed ddp
    flamingo-vlm train --config configs/train.yaml --resume            # continue the latest checkpoint
    flamingo-vlm train --config configs/train.yaml --export-checkpoint runs/x/checkpoints/step_00001000 --export-to out/
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import plain_help
from .config import DATA_KINDS, DISTRIBUTED, PRECISIONS, SCHEDULES, ConfigError, DataError, TrainConfig


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML training config (see configs/train.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.weight_decay=0.05 (repeatable)")
    p.add_argument("--from-pretrained", help="start from this flamingo-vlm model directory / Hub repo")
    p.add_argument("--data", action="append", default=[], metavar="KIND=URLS",
                   help=f"a dataset (replaces the config's data when given): KIND in {DATA_KINDS}, URLS a shard "
                        "pattern (brace ranges, globs, a directory), e.g. "
                        "interleaved=shards/interleaved-{000000..000009}.tar (repeatable); the i-th of a KIND takes the "
                        "settings of the config's i-th dataset of that KIND (batch size, token limit, ...)")
    p.add_argument("--batch-size", type=int, help="batch size of every dataset")
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--distributed", choices=DISTRIBUTED)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-last", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None, help="LoRA adapters on the LM")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the latest checkpoint of output_dir, or the given checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--no-export", action="store_true", help="do not write output_dir/final at the end")
    p.add_argument("--export-checkpoint", metavar="CHECKPOINT",
                   help="do not train: export this checkpoint (or a run's latest) to the from_pretrained format "
                        "(see --export-to); without --config, the config of the run that wrote it (its config.yaml, "
                        "else the copy in the checkpoint)")
    p.add_argument("--export-to", metavar="DIR", help="where --export-checkpoint writes (default: output_dir/final)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    saved = getattr(args, "checkpoint_config", None)  # --export-checkpoint: the config the checkpoint holds
    if saved is not None:
        cfg = TrainConfig.from_dict(saved).to_dict()
    else:
        cfg = TrainConfig.from_yaml(args.config).to_dict() if args.config else TrainConfig().to_dict()
    if not args.config and saved is None:
        cfg["model"]["lm"] = cfg["model"]["vision"] = None
    if args.from_pretrained:
        cfg["model"]["from_pretrained"] = args.from_pretrained
        for k in ("vision", "vision_pretrained", "lm", "tokenizer"):
            cfg["model"][k] = None
    if args.data:
        data, configured = [], {}
        for entry in cfg.get("data") or []:
            configured.setdefault(entry.get("kind"), []).append(entry)
        for item in args.data:
            kind, sep, urls = item.partition("=")
            if not sep or kind not in DATA_KINDS:
                raise ConfigError(f"--data {item!r} must look like KIND=URLS with KIND in {DATA_KINDS}")
            # The i-th --data of a kind takes the settings of the config's i-th dataset of that kind (its
            # last, past them): batch size, token limit, ...; not its name, which named other data.
            same = configured.get(kind, [])
            given = sum(d["kind"] == kind for d in data)
            settings = {k: v for k, v in same[min(given, len(same) - 1)].items() if k != "name"} if same else {}
            data.append({**settings, "kind": kind, "urls": [urls]})
        cfg["data"] = data
    if args.batch_size is not None:
        for d in cfg["data"]:
            d["batch_size"] = args.batch_size
    flat = {
        "output_dir": args.output_dir, "max_steps": args.max_steps, "precision": args.precision,
        "distributed": args.distributed, "grad_accum": args.grad_accum, "checkpoint_every": args.checkpoint_every,
        "keep_last": args.keep_last, "log_every": args.log_every, "seed": args.seed, "resume": args.resume,
    }
    cfg.update({k: v for k, v in flat.items() if v is not None})
    if args.lr is not None:
        cfg["optim"]["lr"] = args.lr
    if args.warmup_steps is not None:
        cfg["schedule"]["warmup_steps"] = args.warmup_steps
    if args.schedule is not None:
        cfg["schedule"]["kind"] = args.schedule
    if args.gradient_checkpointing is not None:
        cfg["model"]["gradient_checkpointing"] = args.gradient_checkpointing
    if args.lora is not None:
        cfg["lora"]["enabled"] = args.lora
    if args.lora_r is not None:
        cfg["lora"]["r"] = args.lora_r
    if args.no_progress:
        cfg["progress"] = False
    if args.no_export:
        cfg["export"] = False
    config = TrainConfig.from_dict(cfg)
    return config.override(args.set) if args.set else config


def run(args: argparse.Namespace) -> int:
    from ..locking import DirectoryBusy

    try:
        if args.export_checkpoint and not args.config and not args.from_pretrained:
            _run_config(args)
        config = config_from_args(args)
        if args.print_config:
            print(config.to_yaml())
            return 0
        _setup_logging()
        if args.export_checkpoint:
            from .export import export_checkpoint

            out = export_checkpoint(config, args.export_checkpoint, args.export_to or f"{config.output_dir}/final")
            print(f"exported {out}")
            return 0
        from .trainer import train

        try:
            result = train(config)
        except KeyboardInterrupt:
            _say_where_to_resume(config)
            return 130
    except (ConfigError, DataError, DirectoryBusy) as e:
        print(f"flamingo-vlm train: error: {e}", file=sys.stderr)
        return 2
    # a file that cannot be written (train.checkpoint.WriteError, an OSError: says why and where; the previous
    # checkpoints are intact) or read (OSError, CheckpointError, WeightsFileError: ValueErrors) goes to the
    # caller's report_errors: one line, exit 1
    if result.export_dir is not None:
        print(f"trained {result.step} step{'' if result.step == 1 else 's'}; model saved to {result.export_dir}")
    summary = result.data_summary()
    if summary:
        print(summary)
    return 0


def _say_where_to_resume(config) -> None:
    """After Ctrl-C: which checkpoint a ``--resume`` continues from (checkpoints are written whole or
    not at all, so the latest complete one is intact)."""
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(config.output_dir)
    where = (f"the latest checkpoint is {last}; run the same command with --resume to continue from it" if last
             else f"no checkpoint was written in {config.output_dir} yet (one every {config.checkpoint_every} "
                  "steps: checkpoint_every)")
    print(f"flamingo-vlm train: interrupted; {where}", file=sys.stderr)


def _run_config(args: argparse.Namespace) -> None:
    """``--export-checkpoint`` without ``--config``: the run's own config, written beside its checkpoints
    (output_dir/config.yaml), else the one the checkpoint holds (a checkpoint copied elsewhere)."""
    from ..checkpoints import load_weights_file
    from .checkpoint import STATE, resolve_resume

    path = resolve_resume(".", args.export_checkpoint, flag="--export-checkpoint")
    run_config = path.resolve().parent.parent / "config.yaml"
    if run_config.is_file():
        args.config = str(run_config)
        return
    state = load_weights_file(path / STATE)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"--export-checkpoint {args.export_checkpoint}: no config.yaml of its run at {run_config} "
                          f"and none in {path / STATE}; pass --config (the run's config)")
    args.checkpoint_config = state["config"]


def _setup_logging() -> None:
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")


def add_train_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``flamingo-vlm`` parser's subparsers."""
    p = subparsers.add_parser("train", help="train a Flamingo model (perceiver + cross-attention [+ LoRA])",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flamingo_vlm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return plain_help(p)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug (one line, exit code 1), here and in ``flamingo-vlm``."""
    from ..locking import DirectoryBusy

    return OSError, ValueError, ConfigError, DataError, DirectoryBusy


def main(argv: list[str] | None = None) -> int:
    """``python -m flamingo_vlm.train`` (what torchrun starts on every rank): bad input and Ctrl-C in
    one line, as ``flamingo-vlm train`` (torchrun passes Ctrl-C on to every rank)."""
    from ..errors import report_errors

    return report_errors("flamingo-vlm train", lambda: run(build_parser().parse_args(argv)), user_errors)