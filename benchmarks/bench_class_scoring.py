#!/usr/bin/env python
"""ImageNet-style class scoring: ``Flamingo.score`` vs one forward pass per class.

The evaluation ranks all 1000 ImageNet class names (OpenAI CLIP's names, the list OpenFlamingo
used: ``flamingo_vlm.eval.imagenet_classnames``) by their length-normalised log-likelihood after
a few-shot prompt ``<image>Output:{class}<|endofchunk|>... <image>Output:``. Two ways:

* ``score``: :meth:`Flamingo.score`: the prompt runs once; the candidates continue from copies of
  its KV cache, ``--chunk`` candidates per forward pass (what ``flamingo-vlm evaluate`` does);
* ``per-class``: a full forward pass of prompt + class name for each class (OpenFlamingo's
  ``--no_caching_for_classification`` path), with the image latents computed once and reused, so
  only the language-model work is repeated. It is timed on ``--naive-classes`` classes and scaled
  to the full class count (its cost is linear in the number of classes).

Model (random weights; sizes chosen to be "small but not toy" on a CPU): an open_clip ViT
(64 px, patch 16, width 256, 4 layers) + a LLaMA-style LM (hidden 512, 8 layers, 8 heads, MLP 1376)
with gated cross-attention in every layer, and a byte-level BPE tokenizer trained in code on the
class names (vocab 4096), so names take a realistic 1-6 tokens (mean ~3).

Usage::

    PYTHONPATH=src python benchmarks/bench_class_scoring.py            # ~1-2 minutes on 1 CPU thread
    PYTHONPATH=src python benchmarks/bench_class_scoring.py --quick    # seconds
    PYTHONPATH=src python benchmarks/bench_class_scoring.py --device cuda --threads 0

Prints a markdown table and the speed-up; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from flamingo_vlm import FlamingoProcessor, create_model_and_transforms  # noqa: E402
from flamingo_vlm.eval.evaluator import continuation_ids, score_classes  # noqa: E402
from flamingo_vlm.eval.imagenet_classnames import IMAGENET_CLASSNAMES  # noqa: E402
from flamingo_vlm.eval.prompts import build_prompt, classification_prompt  # noqa: E402
from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer  # noqa: E402

TARGET = 5.0


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"Output:{n}" for n in IMAGENET_CLASSNAMES] + ["Question: what is this? Short answer: a photo of a thing."]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tokenizer(args.vocab)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
    )
    lm = AutoModelForCausalLM.from_config(cfg)
    vision = OpenCLIPVisionTransformer(image_size=64, patch_size=16, width=args.vision_width, layers=args.vision_layers,
                                       heads=4, embed_dim=128)
    model, image_processor, tokenizer = create_model_and_transforms(vision, None, lm, tokenizer, cross_attn_every_n_layers=1)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers():
            block.attn_gate.uniform_(-1, 1)
            block.ff_gate.uniform_(-1, 1)
    return model.eval().to(args.device), image_processor, tokenizer


@torch.inference_mode()
def per_class(model, batch, media, candidates):
    """One full forward of prompt + candidate per candidate (length-normalised log-likelihood)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = torch.empty(ids.shape[0], len(candidates))
    for j, cand in enumerate(candidates):
        c = torch.as_tensor(cand, device=ids.device).expand(ids.shape[0], -1)
        full = torch.cat([ids, c], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(c)], dim=1)
        logits = model(None, full, full_mask, media=media).logits[:, ids.shape[1] - 1 : -1].float()
        lp = logits.log_softmax(-1).gather(2, c.unsqueeze(-1)).squeeze(-1)
        out[:, j] = lp.mean(1).cpu()
    return out


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--naive-classes", type=int, default=100, help="classes timed for the per-class baseline")
    p.add_argument("--batch", type=int, default=1, help="images per score call")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--chunk", type=int, default=128, help="candidates per Flamingo.score forward")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vision-width", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small model, 100 classes: a smoke run")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.naive_classes, args.hidden, args.layers, args.repeats = 100, 20, 128, 2, 1
        args.vision_width, args.vision_layers = 64, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    model, ip, tok = build_model(args)
    names = list(dict.fromkeys(IMAGENET_CLASSNAMES))[: args.classes]
    candidates = [continuation_ids(tok, "Output:", n) for n in names]
    lengths = [len(c) for c in candidates]
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (80, 80, 3), generator=g, dtype=torch.uint8).numpy() for _ in range(args.shots + 1)]
    demos = [classification_prompt(names[(7 * i) % len(names)]) for i in range(args.shots)]
    text = build_prompt(demos, classification_prompt(), separator="", with_demo_images=True)
    batch = FlamingoProcessor(tok, ip)([(text, images)] * args.batch)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        media = model.encode_vision_x(batch["vision_x"])

    # warm-up
    model.score(None, batch["input_ids"], candidates[:8], batch["attention_mask"], media=media, normalize=True)
    per_class(model, batch, media, candidates[:2])

    t_score, scores = timed(lambda: score_classes(model, batch["vision_x"], batch["input_ids"], batch["attention_mask"],
                                                  candidates, chunk_size=args.chunk), args.repeats, sync)
    n_naive = min(args.naive_classes, len(candidates))
    t_naive_part, naive = timed(lambda: per_class(model, batch, media, candidates[:n_naive]), args.repeats, sync)
    t_naive = t_naive_part * len(candidates) / n_naive
    diff = (scores[:, :n_naive].float().cpu() - naive).abs().max().item()
    ratio = t_naive / t_score

    n_params = sum(p.numel() for p in model.parameters())
    rows = [
        ("Flamingo.score (cached prompt, chunked candidates)", t_score / args.batch, f"{len(candidates)} classes, chunk {args.chunk}"),
        ("one forward per class (image latents reused)", t_naive / args.batch,
         f"timed on {n_naive} classes, x{len(candidates) / n_naive:g}"),
    ]
    print(f"\n## Class scoring: {len(candidates)} ImageNet class names, {args.shots}-shot prompt of "
          f"{batch['input_ids'].shape[1]} tokens, batch {args.batch}\n")
    print(f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model {n_params / 1e6:.1f}M params (LM hidden {args.hidden} x "
          f"{args.layers} layers, xattn every layer; ViT width {args.vision_width} x {args.vision_layers}); class names "
          f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.2f})\n")
    print("| method | seconds per image | note |")
    print("|---|---|---|")
    for name, sec, note in rows:
        print(f"| {name} | {sec:.3f} | {note} |")
    status = "PASS" if ratio >= TARGET else "BELOW TARGET"
    print(f"\nspeed-up: {ratio:.1f}x (target >= {TARGET:g}x: {status}); max |score difference| on the timed classes: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "classes": len(candidates), "shots": args.shots, "batch": args.batch, "prompt_tokens": batch["input_ids"].shape[1],
            "device": str(device), "threads": torch.get_num_threads(), "params": n_params,
            "seconds_per_image": {"score": t_score / args.batch, "per_class": t_naive / args.batch},
            "naive_classes_timed": n_naive, "speedup": ratio, "max_abs_diff": diff, "torch": torch.__version__,
        }, indent=1))
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
