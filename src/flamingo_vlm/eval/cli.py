"""``flamingo-vlm evaluate``: few-shot evaluation from the command line (``torchrun`` aware)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import UsageError, check_device
from ..registry import DEFAULT_MODEL

__all__ = ["add_evaluate_subcommand", "build_parser", "entry", "main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _IntList(argparse.Action):
    """``--shots 0,4,8`` or ``--shots 0 4 8`` (OpenFlamingo's spelling; it failed as "unrecognized arguments: 4 8")."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for v in values for x in v])


def _pairs(items: list[str] | None, what: str, cast=str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{what} takes TASK=VALUE, got {item!r}")
        try:
            out[key.strip()] = cast(value.strip())
        except ValueError:  # (said "invalid literal for int() with base 10: 'abc'", not which flag)
            raise UsageError(f"{what} takes TASK=VALUE with an integer VALUE, got {item!r}") from None
    return out


def _rank0() -> bool:
    """Whether this process says the notes (once under torchrun, not on every rank)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _trials(args: argparse.Namespace) -> int:
    """--trials, or as many as --seeds gives; both, disagreeing, are a usage error (``--trials 1 --seeds
    1 2`` ran seed 1 only, ``--trials 2 --seeds 5`` seeds 5 and 6; OpenFlamingo asserted they agree)."""
    if args.seeds and args.trials is not None and len(args.seeds) != args.trials:
        raise UsageError(f"--seeds gives {len(args.seeds)} seed(s) but --trials is {args.trials}: give one seed per "
                         "trial, or leave --trials out")
    return args.trials if args.trials is not None else len(args.seeds) if args.seeds else 3


def _run(args: argparse.Namespace) -> int:
    from .evaluator import EvalConfig, evaluate
    from .tasks import get_task

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # (a usage error, exit code 2, like the other flags')
        tasks = [get_task(t.strip()).name for t in args.tasks.split(",") if t.strip()]
    except ValueError as e:
        raise UsageError(f"--tasks: {e}") from None
    if args.synthetic:
        from ..synthetic import BENCHMARK_TASKS, write_synthetic_benchmark
        from .tasks import TASKS

        if args.data_root is None:
            raise UsageError("--synthetic needs --data-root (where to write the synthetic datasets)")
        wanted = [t for t in tasks if t in BENCHMARK_TASKS]
        from pathlib import Path

        try:  # (--task-root takes the aliases --tasks takes: okvqa=, hm=)
            given = {get_task(k).name for k in _pairs(args.task_root, "--task-root")}
        except ValueError as e:
            raise UsageError(f"--task-root: {e}") from None
        for t in tasks:  # ("no folder for task 'hateful_memes' under ...": the cause was that it has no synthetic data)
            if t not in BENCHMARK_TASKS and t not in given and not any(
                    (Path(args.data_root) / f).is_dir() for f in TASKS[t].folders):
                raise UsageError(f"--synthetic writes {', '.join(BENCHMARK_TASKS)}; {t} has no synthetic data: give "
                                 f"its own with --task-root {t}=PATH, or leave it out of --tasks")

        missing = [t for t in wanted if not any((Path(args.data_root) / f).is_dir() for f in TASKS[t].folders)]
        from .evaluator import synthetic_data

        real = [t for t in wanted if t not in missing and not any(
            synthetic_data(Path(args.data_root) / f) for f in TASKS[t].folders if (Path(args.data_root) / f).is_dir())]
        if real and _rank0():  # (a real dataset's scores beside synthetic ones, in one table, said nothing)
            print(f"flamingo-vlm evaluate: note: {', '.join(real)} under {args.data_root} "
                  f"{'is' if len(real) == 1 else 'are'} not the synthetic benchmark's: evaluated as found"
                  + (f", beside synthetic {', '.join(missing)}" if missing else ""), file=sys.stderr)
        meta = Path(args.data_root) / "synthetic.json"
        if len(missing) < len(wanted) and meta.is_file():
            import json

            try:
                seed = json.loads(meta.read_text()).get("seed")
            except (ValueError, AttributeError):
                seed = None
            if seed is not None and seed != args.synthetic_seed:  # (its data was used, silently, for any seed)
                raise UsageError(f"{args.data_root} holds the synthetic benchmark of --synthetic-seed {seed} "
                                 f"({meta}), not {args.synthetic_seed}: give another --data-root for seed "
                                 f"{args.synthetic_seed}, or --synthetic-seed {seed}")
        if missing:
            import os

            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise SystemExit("write the synthetic data once before a torchrun evaluation: "
                                 f"flamingo-vlm data synthetic-benchmark {args.data_root} --tasks {','.join(missing)}")
            write_synthetic_benchmark(args.data_root, seed=args.synthetic_seed, tasks=missing)
    config = EvalConfig(
        tasks=tasks,
        data_root=args.data_root,
        task_roots=_pairs(args.task_root, "--task-root"),
        out_dir=args.out,
        shots=args.shots,
        trials=_trials(args),
        seeds=args.seeds,
        num_samples=args.num_samples,
        query_set_size=args.query_set_size,
        batch_size=args.batch_size,
        demo_selection="rices" if args.rices else args.demo_selection,
        prefix_cache_mb=args.prefix_cache_mb,
        rices_vision_encoder=args.rices_vision_encoder,
        rices_vision_pretrained=args.rices_vision_pretrained,
        rices_cache_dir=args.rices_cache_dir,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_new_tokens=_pairs(args.max_new_tokens, "--max-new-tokens", int),
        ensemble=args.ensemble,
        class_chunk_size=args.class_chunk_size,
        caption_metrics=[m for m in args.caption_metrics.split(",") if m],
        caption_tokenizer=args.caption_tokenizer,
        vqa_gt_normalization=args.vqa_gt_normalization,
        vqa_compat=args.vqa_compat,
        precision=args.precision,
        quantize=args.quantize,
        save_predictions=not args.no_predictions,
        progress=not args.quiet,
        model_name=args.model,
    )
    try:  # values out of range or in conflict: a usage error (exit code 2), before the model loads
        config.validate()
    except ValueError as e:
        raise UsageError(str(e)) from e
    check_device(args.device)
    if config.prefix_cache_mb > 0 and config.demo_selection != "shared" and _rank0():
        print(f"flamingo-vlm evaluate: note: --prefix-cache-mb reuses demonstrations that queries share; with "
              f"{config.demo_selection} demonstrations per query it finds little to reuse (--demo-selection shared "
              "gives every query of a trial the same ones)", file=sys.stderr)
    if args.precision == "fp16":
        import torch

        from ..modeling.fast_linear import emulated_fp16_note

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # (evaluate's default)
        note = emulated_fp16_note(torch.float16, device, "--precision fp32 or bf16")
        if note:
            print(f"flamingo-vlm evaluate: {note}", file=sys.stderr)
    from ..locking import DirectoryBusy

    try:
        result = evaluate(args.model, config, device=args.device)
    except DirectoryBusy as e:
        raise SystemExit(str(e)) from None
    if not args.quiet and _rank0():
        from pathlib import Path

        print((Path(args.out) / "results.md").read_text())
    return 0 if result else 1


def add_evaluate_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an argparse subparsers object (handler stored as ``func``)."""
    p = subparsers.add_parser(
        "evaluate",
        help="few-shot evaluation (COCO, Flickr30K, VQAv2, OK-VQA, TextVQA, VizWiz, Hateful Memes, ImageNet)",
        description="Few-shot evaluation with OpenFlamingo's protocol. Run with torchrun for several processes: "
        "torchrun --nproc_per_node N -m flamingo_vlm.eval --model ... (each sample is evaluated once).",
    )
    add_evaluate_arguments(p)
    p.set_defaults(func=_run)
    return p


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model, model directory or Hub id (flamingo_vlm.load_pretrained; default {DEFAULT_MODEL})")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: coco,flickr30k,vqav2,ok_vqa,textvqa,vizwiz,hateful_memes,imagenet,synthetic_icl "
                        "(aliases: icl for synthetic_icl, hm for hateful_memes)")
    p.add_argument("--data-root", help="folder holding one folder per dataset (mscoco_karpathy/, vqav2/, ...)")
    p.add_argument("--task-root", action="append", metavar="TASK=PATH", help="a dataset's folder (repeatable)")
    p.add_argument("--out", default="results",
                   help="results folder (default ./results; resumable: finished units are skipped)")
    p.add_argument("--shots", type=_ints, nargs="+", action=_IntList, default=[0, 4, 8, 16, 32],
                   help="shot counts, 0,4,8 or 0 4 8 (default 0,4,8,16,32: the paper's)")
    # (OpenFlamingo's evaluate.py names: --num_trials, --trial_seeds)
    p.add_argument("--trials", "--num-trials", type=int, default=None,
                   help="trials per shot count, with different demos (default: one per --seeds, else 3)")
    p.add_argument("--seeds", "--trial-seeds", type=_ints, nargs="+", action=_IntList, default=None,
                   help="trial seeds, 42,43 or 42 43, one per trial (default 42,43,...)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="evaluate a random subset of this size per trial (default: the whole split)")
    p.add_argument("--query-set-size", type=int, default=2048,
                   help="training examples random demos come from (default 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per batch (default 8)")
    p.add_argument("--rices", action="store_true", help="choose demos by image similarity (RICES)")
    p.add_argument("--demo-selection", choices=["random", "shared"], default="random",
                   help="random: demos drawn per query (default); shared: one draw per trial for every query")
    p.add_argument("--prefix-cache-mb", type=float, default=0,
                   help="MiB for reusing the keys/values of prompt prefixes queries share (with --demo-selection "
                        "shared); same results, faster (default 0: off)")
    p.add_argument("--rices-vision-encoder", help="encoder for RICES features (open_clip name or HF id); default: the model's")
    p.add_argument("--rices-vision-pretrained", help="its weights (e.g. openai)")
    p.add_argument("--rices-cache-dir", help="where RICES features are cached (default OUT/rices)")
    p.add_argument("--num-beams", type=int, default=3, help="beams for generated answers (default 3)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam search length penalty (default 0)")
    p.add_argument("--max-new-tokens", action="append", metavar="TASK=N", help="override a task's generation budget")
    p.add_argument("--ensemble", action="store_true", help="classification: average over up to 6 demo orders")
    p.add_argument("--class-chunk-size", type=int, default=128, help="class names scored per chunk (default 128)")
    p.add_argument("--caption-metrics", default="cider,bleu,rouge", help="cider,bleu,rouge[,meteor (needs java)]")
    p.add_argument("--caption-tokenizer", choices=("auto", "java", "python"), default="auto",
                   help="PTB tokenisation for caption metrics: Stanford's (java) or the pure-Python one")
    p.add_argument("--vqa-gt-normalization", choices=("official", "always"), default="official",
                   help="official: normalise answers only when the humans disagree (vqaEval.py); always: every time")
    p.add_argument("--vqa-compat", choices=("official", "openflamingo"), default="official",
                   help="openflamingo: score VQA as OpenFlamingo's vqa_metric.py did (answers always normalised; "
                        "leave-one-out removes every identical answer entry when the file has no answer_id, as "
                        "VizWiz's), to compare with the paper's numbers; default: the official metric")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "amp_bf16"), default="fp32", help="(default fp32)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                    help="weight-only quantized LM, cross-attention and perceiver linears (CPU only; "
                         "int8 also the LM head; speeds per CPU in the README's Quantized weights)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--synthetic", action="store_true",
                   help="write the synthetic benchmark (coco, flickr30k, vqav2, imagenet, synthetic_icl) into "
                        "--data-root first when its datasets are missing")
    p.add_argument("--synthetic-seed", type=int, default=0,
                   help="its generator seed (default 0); a --data-root holding another seed's benchmark is refused")
    p.add_argument("--no-predictions", action="store_true", help="do not store per-sample predictions")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-unit lines, and no table at the end (it is in OUT/results.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and run (INFO)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flamingo_vlm.eval", description=__doc__)
    add_evaluate_arguments(p)
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry(argv: list[str] | None = None) -> int:
    """``python -m flamingo_vlm.eval`` (what ``torchrun`` starts on every rank): bad input and Ctrl-C
    in one line, as ``flamingo-vlm evaluate`` says them (it printed a traceback, on every rank)."""
    from ..errors import report_errors
    from ..train.cli import user_errors

    return report_errors("python -m flamingo_vlm.eval", lambda: main(argv), user_errors)
