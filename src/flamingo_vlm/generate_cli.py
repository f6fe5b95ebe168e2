"""The ``flamingo-vlm generate`` command's arguments (its handler is :func:`flamingo_vlm.generate._run`).

Apart from :mod:`flamingo_vlm.generate`, which imports torch, because every ``flamingo-vlm``
command builds the whole parser first (``--help`` and usage errors too): building it must not
take the seconds that torch's import takes on a small CPU.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UsageError
from .lazy import lazy_function
from .prompt_format import EOC_TOKEN, MEDIA_TOKEN
from .registry import DEFAULT_MODEL

DEFAULT_MAX_NEW_TOKENS = 40


class _Ordered(argparse.Action):
    """Collects --image and --text into one list, keeping their order on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "items", None) or [])
        items.append(("image" if option_string == "--image" else "text", values))
        namespace.items = items


# The spellings of training configs and of torch (``--precision bf16``, ``torch.float32``) for --dtype.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(text: str) -> str:
    """``--dtype``'s value, aliases (``bf16``, ``fp32``, ``torch.bfloat16``) as the names it lists."""
    text = text.strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(text, text)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model name, flamingo-vlm directory, Hub repo id or released OpenFlamingo id "
                        f"(default: {DEFAULT_MODEL}, offline)")
    p.add_argument("--image", action=_Ordered, metavar="PATH", help="an image (repeatable; order with --text kept)")
    p.add_argument("--text", action=_Ordered, metavar="TEXT", help="a text piece (repeatable)")
    p.add_argument("--prompt", help=f"the whole prompt, with one {MEDIA_TOKEN} per image of --images")
    p.add_argument("--images", nargs="+", metavar="PATH", help="images for --prompt, in order")
    p.add_argument("--demo", action="store_true", help="run few-shot tasks on the bundled example images")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS} (--demo: each task's own budget)")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy, or beam search with --num-beams)")
    g.add_argument("--temperature", type=float, default=None, help="with --do-sample; default 1.0")
    g.add_argument("--top-k", type=int, default=None, help="with --do-sample; default 50 (0: no top-k filtering)")
    g.add_argument("--top-p", type=float, default=None, help="with --do-sample; default 1.0")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", metavar="STRING",
                   help=f"also stop at this string, which the output leaves out (repeatable; {EOC_TOKEN} always stops)")
    g.add_argument("--seed", type=int, help="random seed (sampling)")
    o = p.add_argument_group("output and device")
    o.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    o.add_argument("--no-stream", action="store_true", help="print the result at the end")
    o.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", type=dtype_name,
                   help="auto (default): bfloat16 where it runs natively (GPUs, CPUs with AVX512-BF16), else float32")
    o.add_argument("--device", help="cpu, cuda, cuda:1 (default: cpu)")
    o.add_argument("--quantize", choices=["int8", "int4"],
                    help="weight-only quantized LM, cross-attention and perceiver linears (CPU only; "
                         "int8 also the LM head; speeds per CPU in the README's Quantized weights)")


def add_generate_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="few-shot generation from images and text (default: the built-in model)",
                              description="few-shot generation from images and text, and the bundled demo")
    add_generate_arguments(p)
    p.set_defaults(func=_generate)
    return p


SAMPLING_FLAGS = (("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"))
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # transformers' own


def check_decoding_args(args: argparse.Namespace) -> None:
    """The flags that need no model or torch, in range and consistent (:class:`UsageError` otherwise):
    checked before ``generate``'s module (and torch) is imported, so a typo is answered at once."""
    args.items = getattr(args, "items", None) or []
    for _, name in SAMPLING_FLAGS:  # (not given: transformers' defaults)
        if getattr(args, name) is None:
            setattr(args, name, SAMPLING_DEFAULTS[name])
    if args.demo and (args.items or args.prompt is not None):
        raise UsageError("--demo runs the bundled prompts; drop --image/--text/--prompt")
    checks = [
        (args.max_new_tokens is None or args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.num_beams >= 1, "--num-beams must be >= 1"),
        (args.num_return_sequences >= 1, "--num-return-sequences must be >= 1"),
        (args.num_return_sequences <= args.num_beams or args.do_sample,
         "--num-return-sequences > --num-beams needs --do-sample"),
        (not args.do_sample or args.temperature > 0, "--temperature must be > 0 (for greedy decoding drop --do-sample)"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k >= 0, "--top-k must be >= 0 (0: no top-k filtering)"),
        (args.repetition_penalty > 0, "--repetition-penalty must be > 0 (1.0: none)"),
        (all(args.stop or [True]), "--stop needs a non-empty string"),
        (args.seed is None or -(2**63) <= args.seed < 2**64, "--seed must fit in 64 bits"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


_RUN = lazy_function("flamingo_vlm.generate", "_run")


def _generate(args: argparse.Namespace) -> int:
    given = [flag for flag, name in SAMPLING_FLAGS if getattr(args, name) is not None]
    check_decoding_args(args)
    if given and not args.do_sample:  # (transformers ignores them without do_sample)
        verb = "only act" if len(given) > 1 else "only acts"
        print(f"flamingo-vlm generate: note: {', '.join(given)} {verb} with --do-sample; decoding greedily",
              file=sys.stderr)
    return _RUN(args)
