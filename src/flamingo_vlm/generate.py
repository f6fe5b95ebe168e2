"""``flamingo-vlm generate``: few-shot generation from the command line, and the bundled demo.

Images and text go in the order given::

    flamingo-vlm generate --image a.png --text "Output:a red circle.<|endofchunk|>" --image b.png --text "Output:"
    flamingo-vlm generate --prompt "<image>Output:a red circle.<|endofchunk|><image>Output:" --images a.png b.png
    flamingo-vlm generate --demo          # few-shot tasks on the bundled example images

With ``--image``/``--text`` (and in ``--demo``), a text that ends with ``<|endofchunk|>`` closes a
demonstration and the model's ``config.demo_separator`` follows it, as the server's chat mapping
writes it (``"\\n"`` for the built-in model, nothing for OpenFlamingo's checkpoints); ``--prompt`` is
taken as written.

The default ``--model`` is the built-in offline model (:data:`flamingo_vlm.registry.DEFAULT_MODEL`).
Output streams to the terminal as it is generated (greedy or sampling, one sequence); ``--json``
prints one JSON object instead. Bad input is refused before the model loads where it can be:
flags out of range or that contradict each other raise :class:`~flamingo_vlm.cli.UsageError`
(exit code 2), images that are missing, directories, not images, truncated or decompression bombs
raise ``FileNotFoundError``/``ValueError`` naming the file (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UsageError, check_device
from .hub import check_model_available
from .modeling.fast_linear import auto_dtype, emulated_fp16_note
from .modeling.lm_info import lm_context_limit
from .modeling.quantize import weights_summary
from .generate_cli import DEFAULT_MAX_NEW_TOKENS, add_generate_subcommand, check_decoding_args  # noqa: F401 (re-exported)
from .prompt_format import EOC_TOKEN, MEDIA_TOKEN, cut_at_stop, stop_holdback

__all__ = ["DemoTask", "add_generate_subcommand", "demo_tasks", "example_image", "generate_text", "join_demonstrations"]


def example_image(name: str) -> Path:
    """A bundled example image (``flamingo_vlm/examples/<name>``)."""
    path = Path(str(resources.files("flamingo_vlm") / "examples" / name))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled example image {name!r} (in {path.parent})")
    return path


@dataclass
class DemoTask:
    title: str
    # ("image", file name) / ("text", str); a demonstration's text ends at its <|endofchunk|>: the
    # model's demonstration separator is added by joined()
    items: list
    expected: str  # what a correct model says (from the generator's ground truth)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # answers to rank by likelihood after the prompt, as the evaluation does (e.g. the names
    # the demonstrations bound): shown beside the free generation
    candidates: tuple[str, ...] = ()

    def joined(self, separator: str) -> list:
        """``items`` with ``separator`` (a model's ``config.demo_separator``: "\\n" for the built-in
        model, "" for OpenFlamingo's checkpoints) after each demonstration's ``<|endofchunk|>``."""
        return list(zip([k for k, _ in self.items], join_demonstrations([v for _, v in self.items], separator)))


def demo_tasks() -> list[DemoTask]:
    """The few-shot demo: captioning, VQA, classification and made-up-name binding, on bundled
    images the model never saw in training (evaluation seeds; the names are held out too)."""
    spec = json.loads((Path(str(resources.files("flamingo_vlm") / "examples" / "demo.json"))).read_text())
    return [DemoTask(t["title"], [tuple(i) for i in t["items"]], t["expected"], t.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                     tuple(t.get("candidates", ()))) for t in spec["tasks"]]


def rank_candidates(model, image_processor, tokenizer, sample, candidates) -> list[tuple[str, float]]:
    """``candidates`` continuing the interleaved ``sample``, most likely first, each with its share
    of the candidates' total probability (summed token log-probabilities, then a softmax)."""
    from .eval.evaluator import continuation_ids

    if not candidates:
        raise ValueError("no candidates to rank")
    vision_x, input_ids, attention_mask = _model_inputs(model, image_processor, tokenizer, sample)
    anchor = next(x for x in reversed(sample) if isinstance(x, str))
    ids = [continuation_ids(tokenizer, anchor, " " + c) for c in candidates]
    with torch.inference_mode():
        scores = model.score(vision_x, input_ids, ids, attention_mask)[0].float()
    probs = scores.softmax(-1).tolist()
    return sorted(zip(candidates, probs), key=lambda cp: -cp[1])


def _load(model_name: str, dtype: str | None, device: str | None, quantize: str | None = None):
    from .pretrained import from_pretrained

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    torch_dtype = auto_dtype(device) if dtype in (None, "auto") else names[dtype]
    return from_pretrained(model_name, dtype=torch_dtype, device=device, quantize=quantize)


def _read_image(path: str):
    import warnings

    from PIL import Image

    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"image {path} is a directory, not an image file")
    if not p.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely (a decompression bomb?): {e}; downscale it "
                         "first (the model sees it at its input size, e.g. 224 x 224)") from None
    except PermissionError:
        raise PermissionError(f"image {path} cannot be read: permission denied") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError, ...
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def _model_inputs(model, image_processor, tokenizer, sample):
    """``(vision_x, input_ids, attention_mask)`` of one interleaved sample, on the model's device and
    vision dtype (``vision_x`` is a zero image when the prompt has none)."""
    from .processing import FlamingoProcessor

    batch = FlamingoProcessor(tokenizer, image_processor)([sample])
    dtype = next(model.perceiver.parameters()).dtype
    device = model.device
    return (batch["vision_x"].to(device=device, dtype=dtype), batch["input_ids"].to(device),
            batch["attention_mask"].to(device))


def generate_text(model, image_processor, tokenizer, sample, *, stream=None, **gen_kwargs) -> tuple[list[str], int]:
    """Generate for one interleaved ``sample`` (a :class:`~flamingo_vlm.FlamingoProcessor` sample);
    returns the decoded continuations and how many tokens were generated. ``stream``: a callable
    that receives text pieces as they are decoded (single sequence only). A continuation ends
    before the first of ``stop_strings`` in it, as the server's answers do (transformers stops
    after the token that completes it): neither the texts nor the stream show the stop string."""
    vision_x, input_ids, attention_mask = _model_inputs(model, image_processor, tokenizer, sample)
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty (no tokens): give some text or an image")
    _check_context(model, input_ids.shape[1], gen_kwargs.get("max_new_tokens"))
    if gen_kwargs.get("stop_strings") and "tokenizer" not in gen_kwargs:
        gen_kwargs["tokenizer"] = tokenizer  # transformers matches stop strings through the tokenizer
    stops = list(gen_kwargs.get("stop_strings") or ())
    streamer = _Streamer(tokenizer, stream, stops) if stream is not None else None
    with torch.inference_mode():
        out = model.generate(vision_x, input_ids, attention_mask, streamer=streamer, **gen_kwargs)
    new = out[:, input_ids.shape[1]:]
    texts = [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True).lstrip(), stops)[0] for row in new]
    eos = gen_kwargs.get("eos_token_id", model.eoc_token_id)
    ends = {int(i) for i in (eos if isinstance(eos, (list, tuple, set)) else [eos]) if i is not None}
    ends.add(model.eoc_token_id)
    pad = gen_kwargs.get("pad_token_id", model.pad_token_id)  # (what a row stopped by a stop string is filled with)
    if pad is not None:
        ends.add(int(pad))
    return texts, sum(_generated_length(row.tolist(), ends) for row in new)


def _generated_length(row: list[int], ends: set[int]) -> int:
    """The tokens a returned sequence generated: up to its first end token (not counted), not the
    padding after it that a batch of sequences of different lengths gets (generate never picks the
    pad token: it is suppressed where it is no end token)."""
    return next((i for i, token in enumerate(row) if token in ends), len(row))


class ContextTooLong(ValueError):
    """A prompt that, with the tokens asked for, does not fit the LM's context: ``what`` (the fact), then
    what to do."""

    def __init__(self, what: str, advice: str):
        super().__init__(f"{what}; {advice}")
        self.what = what


def _check_context(model, n_prompt: int, max_new_tokens: int | None) -> None:
    """A prompt that with the tokens asked for does not fit the LM's context is refused (transformers
    only warns, then generates from positions the LM never saw, or fails on an index)."""
    limit, _ = lm_context_limit(model.lang_encoder)
    if limit is None:
        return
    if n_prompt >= limit:
        raise ContextTooLong(f"the prompt has {n_prompt} tokens, more than this model's context of {limit}", "shorten it")
    if max_new_tokens is not None and n_prompt + max_new_tokens > limit:
        raise ContextTooLong(f"the prompt has {n_prompt} tokens and max_new_tokens asks for {max_new_tokens} more, past "
                             f"this model's context of {limit} tokens",
                             f"shorten the prompt or lower max_new_tokens (at most {limit - n_prompt})")


class _Streamer:
    """A transformers streamer that hands decoded text to a callback as soon as it is stable: not
    while it ends in an incomplete character or could still grow into one of ``stops``, and never
    a stop string or what follows it."""

    def __init__(self, tokenizer, callback, stops=()):
        self.tokenizer, self.callback, self.stops = tokenizer, callback, list(stops)
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        if self.stopped:
            return
        text, self.stopped = cut_at_stop(self._text(), self.stops)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self._show(text if self.stopped else text[:len(text) - stop_holdback(text, self.stops)])

    def _show(self, text: str) -> None:
        if len(text) > self.printed:
            self.callback(text[self.printed:])
            self.printed = len(text)

    def _text(self) -> str:
        # The leading space of a continuation ("Output: a ..." tokenises as " a") is not shown.
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def end(self):
        self._show(cut_at_stop(self._text(), self.stops)[0])


def _check_args(args) -> None:
    """Decoding flags in range and consistent, and the device one that exists (UsageError otherwise),
    before anything is loaded. (The command line checks the flags before importing this module.)"""
    check_decoding_args(args)
    check_device(args.device)


def _gen_kwargs(args) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, num_beams=args.num_beams,
              num_return_sequences=args.num_return_sequences, do_sample=args.do_sample)
    if args.do_sample:
        kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.repetition_penalty != 1.0:
        kw["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        kw["stop_strings"] = list(args.stop)
    return kw


def join_demonstrations(sample: list, separator: str) -> list:
    """An interleaved ``sample`` with ``separator`` after each text that closes a demonstration (ends
    with ``<|endofchunk|>`` and is not the last item)."""
    last = len(sample) - 1
    return [x + separator if isinstance(x, str) and x.endswith(EOC_TOKEN) and i < last else x
            for i, x in enumerate(sample)]


def _sample_from_args(args):
    if args.prompt is not None:
        if args.items:
            raise UsageError("use either --prompt/--images or --image/--text, not both")
        n = args.prompt.count(MEDIA_TOKEN)
        if n != len(args.images or []):
            raise UsageError(f"--prompt has {n} {MEDIA_TOKEN} marker(s) but {len(args.images or [])} image(s) were "
                             f"given with --images; give one image per {MEDIA_TOKEN}")
        if not args.prompt.strip():
            raise UsageError("--prompt is empty: give the text to continue (with one <image> per image of --images)")
        images = [_read_image(p) for p in (args.images or [])]
        return (args.prompt, images), args.prompt
    if not args.items:
        raise UsageError("give a prompt (--image/--text ..., or --prompt with --images), or run --demo")
    if args.images:
        raise UsageError("--images goes with --prompt; with --image/--text give each image with --image")
    texts = [value for kind, value in args.items if kind == "text"]
    if any(MEDIA_TOKEN in t for t in texts):
        raise UsageError(f"--text must not contain {MEDIA_TOKEN}: give each image with --image where it goes "
                         f"(or use --prompt with --images)")
    if len(texts) == len(args.items) and not "".join(texts).strip():
        raise UsageError("the prompt is empty: give some text with --text (and images with --image)")
    return [_read_image(value) if kind == "image" else value for kind, value in args.items], None


def _run_demo(args, model, image_processor, tokenizer) -> int:
    results = []
    separator = model.config.demo_separator  # the model's own few-shot format
    for task in demo_tasks():
        sample, shown = [], []
        for kind, value in task.joined(separator):
            if kind == "image":
                sample.append(_read_image(str(example_image(value))))
                shown.append(f"[{value}]")
            else:
                sample.append(value)
                shown.append(value)
        prompt = "".join(shown)
        kw = _gen_kwargs(args)
        kw["max_new_tokens"] = min(args.max_new_tokens or task.max_new_tokens, task.max_new_tokens)
        if not args.json:
            print(f"\n== {task.title}")
            shown_prompt = prompt.replace(EOC_TOKEN + separator, EOC_TOKEN) if separator else prompt
            print("prompt: " + shown_prompt.replace(EOC_TOKEN, EOC_TOKEN + "\n        "))
            print("model:  ", end="", flush=True)
        start = time.perf_counter()
        stream = None if args.json or args.no_stream else (lambda s: print(s, end="", flush=True))
        try:
            texts, n = generate_text(model, image_processor, tokenizer, sample, stream=stream, **kw)
        except ContextTooLong as e:  # (a model of a short context: the other tasks still run)
            reason = e.what
            if not args.json:
                print(f"(skipped: {reason})")
            results.append({"task": task.title, "prompt": prompt, "skipped": reason})
            continue
        seconds = time.perf_counter() - start
        ranked = rank_candidates(model, image_processor, tokenizer, sample, task.candidates) if task.candidates else None
        if not args.json:
            if stream is None:
                print(texts[0], end="")
            if ranked:
                print("\nranked: " + " | ".join(f"{c} {p:.0%}" for c, p in ranked), end="")
            print(f"\nexpect: {task.expected}   ({n} tokens, {seconds:.1f} s)")
        result = {"task": task.title, "prompt": prompt, "output": texts[0].strip(), "expected": task.expected,
                  "tokens": n, "seconds": round(seconds, 3)}
        if ranked:
            result["ranked"] = [{"answer": c, "probability": round(p, 4)} for c, p in ranked]
        results.append(result)
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    if all("skipped" in r for r in results):
        print("flamingo-vlm generate: error: no demo prompt fits this model's context", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    sample = shown = None
    if not args.demo:
        sample, shown = _sample_from_args(args)  # check the input before the (slower) model load
    check_model_available(args.model)  # a missing model, before the seconds of importing the loading layer
    if args.seed is not None:
        torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, image_processor, tokenizer = _load(args.model, args.dtype, args.device, args.quantize)
    load_s = time.perf_counter() - start
    if not args.json:
        print(f"[{args.model} loaded in {load_s:.1f} s: {weights_summary(model)}]", file=sys.stderr)
    param = next(model.perceiver.parameters())
    note = emulated_fp16_note(param.dtype, param.device)
    if note:
        print(note, file=sys.stderr)
    if args.demo:
        return _run_demo(args, model, image_processor, tokenizer)
    if shown is None:  # --image/--text: demonstrations joined in the model's format
        sample = join_demonstrations(sample, model.config.demo_separator)
        shown = "".join(x if isinstance(x, str) else MEDIA_TOKEN for x in sample)
    kw = _gen_kwargs(args)
    single = args.num_return_sequences == 1 and args.num_beams == 1
    stream = None
    if single and not args.json and not args.no_stream:
        stream = lambda s: print(s, end="", flush=True)  # noqa: E731
    start = time.perf_counter()
    texts, n = generate_text(model, image_processor, tokenizer, sample, stream=stream, **kw)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": args.model, "prompt": shown, "outputs": [t.strip() for t in texts],
                          "generated_tokens": n, "seconds": round(seconds, 3)}, indent=2))
    elif stream is not None:
        print()
    else:
        for i, t in enumerate(texts):
            print(f"[{i}] {t.strip()}" if len(texts) > 1 else t.strip())
    return 0
