"""``flamingo-vlm``: a thin command line over the library.

Errors: a subcommand that fails on bad input prints one line, ``flamingo-vlm CMD: error: ...``,
naming what was wrong (and the file, for a file), and no traceback. Exit codes: 2 for a usage error
(argparse's, and :class:`UsageError`: flags that contradict each other or values out of range),
1 for input that cannot be used (a missing or damaged file, a bad checkpoint, ...: ``OSError``,
``ValueError`` and the package's own error types), 130 on Ctrl-C. Anything else is a bug and keeps
its traceback; ``FLAMINGO_VLM_TRACEBACK=1`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UsageError, plain_help, report_errors


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug (exit code 1): training's are the only ones
    beyond OSError and ValueError, and ``python -m flamingo_vlm.train`` words them the same."""
    from .train.cli import user_errors

    return user_errors()


def _convert(args: argparse.Namespace) -> int:
    from .registry import OPENFLAMINGO_RELEASES, get_release

    release = get_release(args.release) if args.release else None
    if args.release and release is None:
        raise UsageError(f"unknown release {args.release!r}; known: {', '.join(OPENFLAMINGO_RELEASES)}")
    vision = args.vision or (release.vision if release else None)
    lm = args.lm or (release.lang_encoder if release else None)
    if not vision or not lm:
        raise UsageError("convert needs --release, or --vision and --lm (and usually --tokenizer)")
    if args.cross_attn_every_n_layers is not None and args.cross_attn_every_n_layers < 1:
        raise UsageError(f"--cross-attn-every-n-layers must be >= 1, got {args.cross_attn_every_n_layers}")
    # (after the checks above: these import torch and transformers, ~5 s before a usage error was said)
    from .checkpoints import cross_attention_interval, load_openflamingo_checkpoint, read_state_dict
    from .factory import create_model_and_transforms
    from .pretrained import check_save_target
    from .references import vision_ref

    vision_pretrained = (args.vision_pretrained if args.vision_pretrained is not None
                         else (release.vision_pretrained if release else None))
    check_save_target(args.out)  # a file, or a folder of other things, is refused before anything loads
    state_dict = read_state_dict(args.checkpoint)  # a missing or damaged file fails before the backbones load
    # An open_clip architecture without weights is random; OpenFlamingo's checkpoints do not hold the
    # image encoder (only full state dicts do), so the converted model would see noise, silently. Its
    # training script kept every key with "embed" in it, the ViT's class and position embeddings too:
    # those alone are not the encoder.
    if (vision_ref(vision, vision_pretrained).kind in ("open_clip", "open_clip_config") and not vision_pretrained
            and not any(key.startswith("vision_encoder.") and "embed" not in key for key in state_dict)):
        raise UsageError(
            f"--vision {vision} without --vision-pretrained is a randomly initialised image encoder, and "
            f"{args.checkpoint} does not hold one; pass its weights: --vision-pretrained openai (the released "
            "models' ViT-L-14), a Hub tag or a weights file"
        )
    every = args.cross_attn_every_n_layers or (release.cross_attn_every_n_layers if release else None)
    if every is None:  # OpenFlamingo's checkpoints say it by where their cross-attention sits
        every = cross_attention_interval(state_dict) or 1
        print(f"{args.checkpoint}: cross-attention every {every} decoder layer(s), as in the checkpoint")
    model, image_processor, tokenizer = create_model_and_transforms(
        vision,
        vision_pretrained,
        lm,
        args.tokenizer or (release.tokenizer if release else lm),
        cross_attn_every_n_layers=every,
        decoder_layers_attr_name=args.decoder_layers_attr_name,
        cache_dir=args.cache_dir,
        vision_tokens_ln_post=args.vision_tokens_ln_post,
    )
    report = load_openflamingo_checkpoint(model, state_dict, name=args.checkpoint)
    print(f"{args.checkpoint}: {report}")
    for key in report.unexpected:
        print(f"  unexpected: {key}")
    out = model.save_pretrained(args.out, tokenizer=tokenizer, image_processor=image_processor,
                                include_backbones=True if args.include_backbones else None)
    print(f"saved {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flamingo-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="turn an OpenFlamingo checkpoint.pt into a flamingo-vlm model directory")
    p.add_argument("checkpoint", help="OpenFlamingo checkpoint (.pt/.bin/.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--release", help="a released OpenFlamingo repo id, e.g. openflamingo/OpenFlamingo-3B-vitl-mpt1b")
    p.add_argument("--vision", help="open_clip name (ViT-L-14), open_clip config JSON, or HF CLIP/SigLIP id/dir")
    p.add_argument("--vision-pretrained", help="open_clip weights tag or file (e.g. openai)")
    p.add_argument("--vision-tokens-ln-post", action="store_true",
                   help="apply ln_post to ViT tokens (open_clip >= 2.23); released weights need it off")
    p.add_argument("--lm", help="language model Hub id or directory")
    p.add_argument("--tokenizer", help="tokenizer Hub id or directory (default: --lm)")
    p.add_argument("--cross-attn-every-n-layers", type=int,
                   help="default: the release's, else where the checkpoint's cross-attention sits")
    p.add_argument("--decoder-layers-attr-name")
    p.add_argument("--cache-dir")
    p.add_argument("--include-backbones", action="store_true", help="copy the backbones into the output")
    p.set_defaults(func=_convert)

    from .generate_cli import add_generate_subcommand

    add_generate_subcommand(sub)
    from .data.custom import add_data_subcommand
    from .synthetic.cli import add_synthetic_subcommands

    add_data_subcommand(sub, extra=[add_synthetic_subcommands])
    from .eval.cli import add_evaluate_subcommand

    add_evaluate_subcommand(sub)
    from .train.cli import add_train_subcommand
    from .train.grow import add_grow_subcommand

    add_train_subcommand(sub)
    add_grow_subcommand(sub)
    from .serve.cli import add_serve_subcommand

    add_serve_subcommand(sub)
    plain_help(parser)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (innermost) subcommand ``args`` ran, e.g. ``data write``'s."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions and actions[0].dest != argparse.SUPPRESS else None
        if chosen is None or chosen not in actions[0].choices:
            return parser
        parser = actions[0].choices[chosen]


class _Parser(argparse.ArgumentParser):
    """The top-level parser: arguments no parser took are refused by the subcommand that ran, with its
    usage (``generate --bogus`` printed the list of subcommands and ``flamingo-vlm: error: ...``)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            _subcommand_parser(self, parsed).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("flamingo-vlm: interrupted", file=sys.stderr)
        return 130
    # signed as argparse signs the subcommand's usage errors: "flamingo-vlm data write: error: ..."
    name = _subcommand_parser(parser, args).prog
    return report_errors(name, lambda: args.func(args), _user_errors, prefix=f"{args.command}: ")


def run() -> int:
    """The ``flamingo-vlm`` command: :func:`main`, in a process with the memory allocator that
    :mod:`.allocator` chooses (re-executed once with tcmalloc preloaded where it is installed); under
    ``torchrun``, one that dies with its launcher (:mod:`.lifetime`)."""
    from .allocator import start
    from .lifetime import die_with_launcher

    die_with_launcher()  # under torchrun: dies with it, even of kill -9 (flamingo_vlm.lifetime)
    start("flamingo_vlm")
    return main()


if __name__ == "__main__":
    sys.exit(run())
