"""``flamingo-vlm data synthetic-benchmark | synthetic-shards | episodes | icl-episodes``: synthetic data.

:func:`add_synthetic_subcommands` registers the four on the ``data`` command's subparsers (the
top-level CLI passes it to :func:`flamingo_vlm.data.custom.add_data_subcommand`). Bad flag values stop with
argparse's one-line usage error; bad settings the writers reject, with ``flamingo-vlm data <command>: error: ...``.
"""

from __future__ import annotations

import argparse

from ..errors import UsageError, at_least
from .benchmark import BENCHMARK_TASKS, write_synthetic_benchmark
from .episodes import EPISODE_KINDS, write_episode_shards, write_training_shards
from .icl import ICL_SPLITS, write_icl_shards

__all__ = ["add_synthetic_subcommands"]

_DEFAULT_MIX = "caption=0.25,vqa=0.3,classify=0.15,binding=0.3"


# -- argument types (argparse turns their errors into a one-line usage error) -------------------------
def _shots(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants 'least,most' (e.g. 1,8), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"must satisfy 1 <= least <= most, got {text!r}")
    return lo, hi


_COUNT, _SIZE = at_least(0), at_least(1)


def _weights(text: str, what: str, strip: bool) -> dict[str, float]:
    out = {}
    for item in (i for i in text.split(",") if i):
        try:
            key, value = item.split("=")
            out[key.strip() if strip else key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants '{what},...', got {text!r}") from None
    return out


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


def _mix(text: str) -> dict[str, float]:
    mix = _weights(text, "kind=share", strip=False)
    unknown = sorted(set(mix) - set(EPISODE_KINDS))
    if unknown:  # (said after the parse, exit code 1)
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown)}; choose from {','.join(EPISODE_KINDS)}")
    if any(v < 0 for v in mix.values()) or not sum(mix.values()) > 0:
        raise argparse.ArgumentTypeError(f"shares must be >= 0 and not all 0, got {text!r}")
    return mix


def _question_weights(text: str) -> dict[str, float]:
    return _weights(text, "question_type=weight", strip=True)


# -- handlers -------------------------------------------------------------------------------------------
def _cmd_benchmark(args: argparse.Namespace) -> int:
    paths = write_synthetic_benchmark(args.out, seed=args.seed, tasks=[t for t in args.tasks.split(",") if t],
                                      n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                      image_size=args.image_size, overwrite=args.overwrite)
    for task, path in paths.items():
        print(f"{task}: {path}")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    if args.pairs == 0 and args.documents == 0:
        raise UsageError("--pairs 0 and --documents 0 write nothing; ask for at least one of them")
    shards = write_training_shards(args.out, seed=args.seed, n_pairs=args.pairs, n_documents=args.documents,
                                   image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                   overwrite=args.overwrite)
    for kind, paths in shards.items():
        print(f"{kind}: {len(paths)} shard(s) in {paths[0].parent if paths else '-'}")
    return 0


def _cmd_episodes(args: argparse.Namespace) -> int:
    paths = write_episode_shards(args.out, seed=args.seed, n_documents=args.documents, start=args.start,
                                 shots=args.shots, mix=args.mix, question_weights=args.question_weights or None,
                                 style_rate=args.style_rate,
                                 image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                 overwrite=args.overwrite, progress=True)
    print(f"episodes: {len(paths)} shard(s) in {args.out}")
    return 0


def _cmd_icl(args: argparse.Namespace) -> int:
    paths = write_icl_shards(args.out, split=args.split, n_documents=args.documents, start=args.start, shots=args.shots,
                             seed=args.seed, image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                             overwrite=args.overwrite, progress=True, workers=args.workers)
    print(f"icl episodes ({args.split}): {len(paths)} shard(s) in {args.out}")
    return 0


# -- registration ---------------------------------------------------------------------------------------
def add_synthetic_subcommands(sub) -> None:
    """Register ``synthetic-benchmark``, ``synthetic-shards`` and ``episodes`` on ``sub`` (the
    ``data`` command's subparsers); each handler is stored as ``func``."""
    b = sub.add_parser("synthetic-benchmark", help="write the synthetic evaluation datasets (drawn scenes) in the "
                                                   "standard COCO/Flickr30K/VQAv2/ImageNet layouts")
    b.add_argument("out", help="data root to write the task folders and synthetic.json under")
    b.add_argument("--seed", type=_COUNT, default=0)
    b.add_argument("--tasks", default="coco,vqav2,imagenet", help=f"comma-separated, from {','.join(BENCHMARK_TASKS)}")
    b.add_argument("--n-train", type=_COUNT, default=256)
    b.add_argument("--n-val", type=_COUNT, default=32)
    b.add_argument("--n-test", type=_SIZE, default=64)
    b.add_argument("--image-size", type=_SIZE, default=128)
    b.add_argument("--overwrite", action="store_true", help="replace task folders already in out")
    b.set_defaults(func=_cmd_benchmark)

    s = sub.add_parser("synthetic-shards", help="write synthetic webdataset training shards (image-caption pairs "
                                                "and interleaved few-shot documents)")
    s.add_argument("out", help="output folder (pairs/ and interleaved/ are written in it)")
    s.add_argument("--seed", type=_COUNT, default=0)
    s.add_argument("--pairs", type=_COUNT, default=1000)
    s.add_argument("--documents", type=_COUNT, default=200)
    s.add_argument("--image-size", type=_SIZE, default=128)
    s.add_argument("--samples-per-shard", type=_SIZE, default=1000)
    s.add_argument("--overwrite", action="store_true", help="replace shards already in out")
    s.set_defaults(func=_cmd_shards)

    e = sub.add_parser("episodes", help="write synthetic few-shot episode shards (captioning, VQA, classification, "
                                        "name binding): the built-in model's training data")
    e.add_argument("out", help="output folder for the interleaved shards")
    e.add_argument("--seed", type=_COUNT, default=0)
    e.add_argument("--documents", type=_SIZE, default=16000)
    e.add_argument("--start", type=_COUNT, default=0, help="first document index (to add data in pieces)")
    e.add_argument("--image-size", type=_SIZE, default=224)
    e.add_argument("--samples-per-shard", type=_SIZE, default=500)
    e.add_argument("--shots", type=_shots, default=(1, 8), help="least,most images per document (default 1,8)")
    e.add_argument("--mix", type=_mix, default=_mix(_DEFAULT_MIX), help=f"kind=share,... over {','.join(EPISODE_KINDS)} "
                                                                        f"(default {_DEFAULT_MIX})")
    e.add_argument("--question-weights", type=_question_weights, default={},
                   help="question_type=weight,... for VQA documents (others 1), e.g. 'what color is the=4'")
    e.add_argument("--style-rate", type=_rate, default=0.0,
                   help="share of documents drawn in the in-context episodes' training styles (outlines, textured "
                        "fills and backgrounds, blur, objects off the grid); default 0")
    e.add_argument("--overwrite", action="store_true", help="replace shards already in out")
    e.set_defaults(func=_cmd_episodes)

    i = sub.add_parser("icl-episodes", help="write in-context episodes whose answer format only the demonstrations "
                                            "show (many phrasings, answer maps, framings, drawing styles)")
    i.add_argument("out", help="output folder for the interleaved shards")
    i.add_argument("--split", choices=ICL_SPLITS, default="train",
                   help="train, or heldout: phrasings/answer maps/framings/styles kept for evaluation")
    i.add_argument("--seed", type=_COUNT, default=0)
    i.add_argument("--documents", type=_SIZE, default=10000)
    i.add_argument("--start", type=_COUNT, default=0, help="first document index (to add data in pieces)")
    i.add_argument("--image-size", type=_SIZE, default=224)
    i.add_argument("--samples-per-shard", type=_SIZE, default=500)
    i.add_argument("--shots", type=_shots, default=(1, 8), help="least,most demonstrations per document (default 1,8)")
    i.add_argument("--workers", type=_SIZE, default=1, help="processes drawing images (same output for any number)")
    i.add_argument("--overwrite", action="store_true", help="replace shards already in out")
    i.set_defaults(func=_cmd_icl)
