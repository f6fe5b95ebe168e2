#!/usr/bin/env python
"""Differential check against the ORIGINAL OpenFlamingo on the same weights.

The original (open-flamingo 2.0.1) runs in the peer venv that ``../shared/peer/setup.sh`` creates
(transformers 5.17); ours in this venv. For each LM family and setting the peer side builds a tiny
random model through the original's ``create_model_and_transforms``, randomises the gates, saves
the LM (``save_pretrained``), its full ``state_dict`` and the inputs, and runs the cases; our side
builds ours from the same LM directory, loads the original's state dict with ``strict=True``, runs
the same cases and saves its own state dict, which the peer side then loads with ``strict=True``
into a freshly built original (different random init) and runs the forward case again. Weights
travel; nothing is re-seeded across the two sides (random inits differ between releases).

Cases (identical calls on both sides, ``run_cases``):
  fwd      forward logits (valid positions) and loss with labels (pads, <image> and each row's first
           token -100: a left-padded row's first label would be scored from a pad position, whose
           logits are undefined), a left-padded batch of three rows:
           3 images from the start / text before the first image and an image mid-text / one image
  single   each row alone, unpadded
  greedy1  greedy, batch 1 (row 0, and row 1 whose prompt starts with text)
  greedy2  greedy, the left-padded batch of rows 0-1
  beam3    num_beams=3, batch 1 and the padded batch
  scores   greedy's per-step scores (``output_scores``), the padded batch
Settings per family: the reference fixtures' interval and the other one of {1, 2}, with
``only_attend_immediate_media`` True, and the fixtures' interval with False. With False the
original lets text before the first image attend to all images (a documented bug, README "Masks"):
that case compares only image-first prompts, and the text-first row is reported apart ("pre-image").

Usage (from the repository root, in our venv):
  bash ../shared/peer/setup.sh                     # once: ~/.cache/peer/venv
  python research/peer_parity.py [--families mpt,llama,opt,gpt_neox] [--work /tmp/peer-parity]
Prints a table of max |diff| per comparison and exits 1 if any is above 1e-4 or any ids differ.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLAMINGO_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "reference" / "openflamingo-tf4.33"
PEER_TOOLS = Path(os.environ.get("PEER_TOOLS", SHARED / "peer"))
PEER_PYTHON = Path(os.environ.get("PEER_PYTHON", Path.home() / ".cache/peer/venv/bin/python"))
ATOL = 1e-4
BASE_VOCAB = 400  # the fixtures' tokenizer; <|endofchunk|>, <image>, <PAD> are 400-402
ALIAS = re.compile(r"^lang_encoder\.(old_decoder_blocks|gated_cross_attn_layers)\.")
MAX_NEW = 8

PROMPTS = [
    "<image>An image of two cats.<|endofchunk|><image>An image of a bathroom sink.<|endofchunk|><image>An image of",
    "A photo of the street. <image>A red car parked<|endofchunk|> on the street and a<image> dog playing",
    "Question: What color is the bus?<image> Short answer:",
    "Output: a kitchen with white cabinets. Output: a train",  # text only (0-shot demos are)
]
# image-first prompts for only_attend_immediate_media=False (no text before the first image)
PROMPTS_ALL_MEDIA = [
    PROMPTS[0],
    "<image>A red car.<|endofchunk|> A man riding a horse<image> on the beach.<|endofchunk|>Output:",
    "<image>Question: What color is the bus? Short answer:",
]


# Families without a fixture folder (kwargs as ../shared/peer/_peer_common.py's FAMILIES). GPT-Neo and
# GPT-2 are not in the original's decoder-layer table (layers_attr given to it; ours finds them).
EXTRA_FAMILIES = {
    "gptj": dict(model_type="gptj", xattn_every=1, layers_attr=None, kwargs=dict(
        n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8, n_inner=128)),
    "gpt_neo": dict(model_type="gpt_neo", xattn_every=1, layers_attr="transformer.h", kwargs=dict(
        hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=256,
        attention_types=[[["global", "local"], 2]], window_size=16, intermediate_size=128)),
    "gpt2": dict(model_type="gpt2", xattn_every=1, layers_attr="transformer.h", kwargs=dict(
        n_embd=64, n_layer=4, n_head=4, n_positions=256, n_inner=128)),
}
# Absolute position embeddings: the original passes no position ids, so a left-padded row is shifted
# (a documented bug of the original); there ours' padded batch is compared with the original's rows alone.
ABSOLUTE_POSITIONS = {"gpt2", "gpt_neo"}
BATCH_CASES = {"fwd_logits", "fwd_loss", "greedy2", "beam3_b2", "scores_b2", "greedy4", "greedy2_eos",
               "greedy2_eos_min4", "beam3_b2_eos", "beam3_b2_eos_lp0", "beam3_b2_ret2"}


def settings(family_xattn: int):
    other = 1 if family_xattn != 1 else 2
    return [(family_xattn, True), (other, True), (family_xattn, False)]


def setting_name(family, xattn, immediate):
    return f"{family}-x{xattn}-{'imm' if immediate else 'all'}"


# -- the cases: the same calls on both sides ---------------------------------------------------
def make_inputs(tokenizer, immediate: bool, seed: int = 0):
    prompts = PROMPTS if immediate else PROMPTS_ALL_MEDIA
    media_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    singles = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    n_img = [int((s == media_id).sum()) for s in singles]
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.zeros(len(prompts), max(n_img), 1, 3, 64, 64)
    for r, n in enumerate(n_img):  # rows with fewer images are zero-padded, as users do
        vision_x[r, :n] = torch.randn(n, 1, 3, 64, 64, generator=g)
    labels = enc["input_ids"].clone()
    labels[(labels == pad_id) | (labels == media_id)] = -100
    # A left-padded row's first token would be "predicted" from a pad position, whose logits are
    # undefined (they differ between the two for OPT, which places pads at another position):
    # no label there, as an unpadded row has none for its first token.
    first = enc["attention_mask"].argmax(1)
    labels[torch.arange(len(prompts)), first] = -100
    inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels,
                  vision_x=vision_x, singles=singles, n_img=n_img, pad_id=pad_id)
    tokenizer.padding_side = "right"  # as training batches are (OpenFlamingo's train scripts)
    right = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    right_labels = right["input_ids"].clone()
    right_labels[(right_labels == pad_id) | (right_labels == media_id)] = -100
    inputs.update(right_ids=right["input_ids"], right_mask=right["attention_mask"], right_labels=right_labels)
    # a continuation scored on a KV cache (classification-style scoring)
    inputs["cont_ids"] = tokenizer(" two cats on a red car", return_tensors="pt")["input_ids"]
    # generation right after an <image> (the prompt's last token)
    inputs["last_ids"] = tokenizer("<image>A red car.<|endofchunk|><image>", return_tensors="pt")["input_ids"]
    inputs["last_vision_x"] = torch.randn(1, 2, 1, 3, 64, 64, generator=g)
    if not immediate:
        # the text-first prompt, alone: where the original's known bug shows
        inputs["pre_image_ids"] = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
        inputs["pre_image_vision_x"] = torch.randn(1, 2, 1, 3, 64, 64, generator=g)
    return inputs


def run_cases(model, inputs, gen_extra: dict, forward_only: bool = False):
    """gen_extra: ours passes allow_image_tokens=True (the original may emit <image>; ours never
    does by default, a documented difference)."""
    out = {}
    ids, mask, vx = inputs["input_ids"], inputs["attention_mask"], inputs["vision_x"]
    with torch.no_grad():
        o = model(vx, ids, mask, inputs["labels"])
        out["fwd_logits"], out["fwd_loss"] = o.logits, o.loss
        o = model(vx, inputs["right_ids"], inputs["right_mask"], inputs["right_labels"])
        out["fwd_right_logits"], out["fwd_right_loss"] = o.logits, o.loss
        for r, single in enumerate(inputs["singles"]):  # (a text-only row gets one blank image)
            out[f"single{r}_logits"] = model(vx[r:r + 1, :max(inputs["n_img"][r], 1)], single).logits
        if "pre_image_ids" in inputs:
            out["pre_image_logits"] = model(inputs["pre_image_vision_x"], inputs["pre_image_ids"]).logits
        if forward_only:
            return out
        # the context, then a continuation on its KV cache (row 0). The original's way, as its
        # evaluation code scores classes: cache_media, then forward with vision_x=None; ours keeps no
        # conditioning state: the images are passed again with the cache.
        ctx, cont = inputs["singles"][0], inputs["cont_ids"]
        v = vx[:1, :inputs["n_img"][0]]
        if type(model).__module__.startswith("open_flamingo"):  # the original
            model.cache_media(input_ids=ctx, vision_x=v)
            first = model(None, ctx, clear_conditioned_layers=False, use_cache=True)
            nxt = model(None, cont, past_key_values=first.past_key_values, clear_conditioned_layers=False,
                        use_cache=True)
            model.uncache_media()
        else:
            first = model(v, ctx, use_cache=True)
            cache = getattr(first, "past_key_values", None) or getattr(first, "cache", None)
            nxt = model(v, cont, past_key_values=cache, use_cache=True)
        out["cached_continuation_logits"] = torch.cat([first.logits, nxt.logits], 1)
        kw = dict(max_new_tokens=MAX_NEW, pad_token_id=inputs["pad_id"], **gen_extra)
        for r in (0, 1):
            x = inputs["singles"][r]
            v = vx[r:r + 1, :inputs["n_img"][r]]
            out[f"greedy1_row{r}"] = model.generate(v, x, torch.ones_like(x), **kw)[:, x.shape[1]:]
            out[f"beam3_row{r}"] = model.generate(v, x, torch.ones_like(x), num_beams=3, **kw)[:, x.shape[1]:]
        n = ids.shape[1]
        out["greedy2"] = model.generate(vx[:2], ids[:2], mask[:2], **kw)[:, n:]
        out["beam3_b2"] = model.generate(vx[:2], ids[:2], mask[:2], num_beams=3, **kw)[:, n:]
        g = model.generate(vx[:2], ids[:2], mask[:2], output_scores=True, return_dict_in_generate=True, **kw)
        out["scores_b2"] = torch.stack(list(g.scores), 1)
        x = inputs["last_ids"]
        out["greedy1_imagelast"] = model.generate(inputs["last_vision_x"], x, torch.ones_like(x), **kw)[:, x.shape[1]:]
        if len(inputs["singles"]) > 3:  # text only, one blank image
            x = inputs["singles"][3]
            out["greedy1_textonly"] = model.generate(vx[3:4, :1], x, torch.ones_like(x), **kw)[:, x.shape[1]:]
            out["greedy4"] = model.generate(vx, ids, mask, **kw)[:, n:]
        # an eos that row 1 emits early (chosen from greedy's own output, the same on both sides when
        # that matched): rows finishing at different steps, min_new_tokens, beams finishing
        kw["eos_token_id"] = int(out["greedy2"][1, 1])
        out["greedy2_eos"] = model.generate(vx[:2], ids[:2], mask[:2], **kw)[:, n:]
        out["greedy2_eos_min4"] = model.generate(vx[:2], ids[:2], mask[:2], min_new_tokens=4, **kw)[:, n:]
        out["beam3_b2_eos"] = model.generate(vx[:2], ids[:2], mask[:2], num_beams=3, **kw)[:, n:]
        # the evaluation's beam settings (OpenFlamingo's eval: 3 beams, length_penalty 0)
        out["beam3_b2_eos_lp0"] = model.generate(vx[:2], ids[:2], mask[:2], num_beams=3, length_penalty=0.0,
                                                 **kw)[:, n:]
        out["beam3_b2_ret2"] = model.generate(vx[:2], ids[:2], mask[:2], num_beams=3, num_return_sequences=2,
                                              **kw)[:, n:]
        # sampling at batch 1 (the original's vision_x expansion covers num_beams only), same seed
        torch.manual_seed(0)
        x = inputs["singles"][0]
        out["sample_row0"] = model.generate(vx[:1], x, torch.ones_like(x), do_sample=True, top_k=0,
                                            **kw)[:, x.shape[1]:]
    # gradients of the perceiver and cross-attention (a training step's, on the right-padded batch;
    # eval mode: no dropout)
    model.zero_grad(set_to_none=True)
    model(vx, inputs["right_ids"], inputs["right_mask"], inputs["right_labels"]).loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None and ("perceiver." in name or "gated_cross_attn_layer." in name):
            out["grad:" + name] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return out


# -- the original's side (peer venv) -------------------------------------------------------------
def peer_side(plan_path: str, mode: str):
    sys.path.insert(0, str(PEER_TOOLS))
    import _peer_common as pc  # torchvision shim first
    from open_flamingo import create_model_and_transforms

    plan = json.loads(Path(plan_path).read_text())
    vit = json.loads((FIXTURES / "open_clip_config.json").read_text())
    pc.VIT_CONFIGS["parity-vit"] = vit
    pc.register_vit("parity-vit", tempfile.mkdtemp())
    for job in plan["jobs"]:
        try:
            peer_job(job, mode, pc, create_model_and_transforms)
        except Exception as e:  # the original cannot run this family here: reported, not fatal
            import traceback

            traceback.print_exc()
            (Path(job["work"]) / f"peer_{mode}_error.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0])


def peer_job(job, mode, pc, create_model_and_transforms):
    from transformers import AutoModelForCausalLM

    work = Path(job["work"])
    lm_dir = work / "lm"
    if mode == "build":
        torch.manual_seed(job["seed"])
        config = pc.make_lm_config(job["model_type"], job["lm_kwargs"], pc.BASE_VOCAB)
        AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir)
    torch.manual_seed(job["seed"] + (1 if mode == "build" else 99))
    model, _, tokenizer = create_model_and_transforms(
        "parity-vit", None, str(lm_dir), str(FIXTURES / "tokenizer"),
        cross_attn_every_n_layers=job["xattn"], use_local_files=True,
        decoder_layers_attr_name=job.get("layers_attr"))
    for m in model.modules():  # the original's factory has no argument for it
        if hasattr(m, "only_attend_immediate_media"):
            m.only_attend_immediate_media = job["immediate"]
    model.eval()
    if mode == "build":
        g = torch.Generator().manual_seed(job["seed"] + 2)
        for name, p in model.named_parameters():
            if name.endswith("attn_gate") or name.endswith("ff_gate"):
                p.data.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
        inputs = make_inputs(tokenizer, job["immediate"])
        torch.save(inputs, work / "inputs.pt")
        torch.save(model.state_dict(), work / "peer_sd.pt")
        # what the original's training script saves (and its released checkpoint.pt hold)
        sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # imported, unused here
        from open_flamingo.train.train_utils import filter_state_dict_to_trainable

        torch.save(filter_state_dict_to_trainable(model, model.state_dict()), work / "peer_checkpoint.pt")
        out = run_cases(model, inputs, {})
        if not job["immediate"]:
            out["pre_image_logits_fixed"] = fixed_pre_image(model, inputs)
        torch.save(out, work / "peer_out.pt")
    else:  # load ours' state dict strictly into a fresh original, then the forward cases
        sd = torch.load(work / "ours_sd.pt")
        result = model.load_state_dict(sd, strict=False)
        report = dict(missing=list(result.missing_keys), unexpected=list(result.unexpected_keys))
        try:
            model.load_state_dict(sd, strict=True)
            report["strict"] = "ok"
        except RuntimeError as e:
            report["strict"] = str(e).splitlines()[0]
        (work / "peer_load.json").write_text(json.dumps(report))
        inputs = torch.load(work / "inputs.pt")
        torch.save(run_cases(model, inputs, {}, forward_only=True), work / "peer_from_ours.pt")
    print("peer", mode, work.name, flush=True)


def fixed_pre_image(model, inputs):
    """The original with its known bug fixed: text before the first image gets zero cross-attention
    with only_attend_immediate_media=False too (it zeroes such rows in the immediate mode only).
    The attention's output projection has no bias, so zeroing the rows' attention = zeroing the
    block's attention output there."""
    from open_flamingo.src.helpers import MaskedCrossAttention

    def hook(module, args, kwargs, output):
        locations = kwargs.get("media_locations")
        if locations is None or kwargs.get("use_cached_media"):
            return output
        return output.masked_fill((locations.cumsum(-1) == 0)[..., None], 0.0)

    handles = [m.register_forward_hook(hook, with_kwargs=True)
               for m in model.modules() if isinstance(m, MaskedCrossAttention)]
    try:
        with torch.no_grad():
            return model(inputs["pre_image_vision_x"], inputs["pre_image_ids"]).logits
    finally:
        for h in handles:
            h.remove()


# -- our side ------------------------------------------------------------------------------------
def ours_build(job, seed=123):
    from flamingo_vlm import create_model_and_transforms

    work = Path(job["work"])
    torch.manual_seed(seed)
    model, _, tokenizer = create_model_and_transforms(
        str(FIXTURES / "open_clip_config.json"), None, str(work / "lm"), str(FIXTURES / "tokenizer"),
        cross_attn_every_n_layers=job["xattn"],
        vision_tokens_ln_post=True,  # open_clip 3.3 on the peer side applies ln_post to the tokens
        cross_attn_kwargs={"only_attend_immediate_media": job["immediate"]},
    )
    return model.eval(), tokenizer


def key_report(ours_keys: dict, peer_keys: dict):
    """Keys of the original's state dict ours lacks / has extra, and shape mismatches."""
    return dict(
        only_peer=sorted(set(peer_keys) - set(ours_keys)),
        only_ours=sorted(set(ours_keys) - set(peer_keys)),
        shape=sorted(k for k in set(ours_keys) & set(peer_keys) if ours_keys[k] != peer_keys[k]),
    )


def compare(peer: dict, ours: dict, inputs: dict, rows: list):
    """rows: (comparison, max |diff| or 'ids equal' / 'ids DIFFER', ok)."""
    valid = inputs["attention_mask"].bool()
    grads = [k for k in peer if k.startswith("grad:")]
    if grads:
        missing = [k for k in grads if k not in ours]
        # relative to each tensor's largest gradient (they reach ~0.3 here)
        d = max(((peer[k] - ours[k]).abs().max() / peer[k].abs().max().clamp(min=1e-12)).item()
                for k in grads if k in ours)
        rows.append((f"grads (relative), {len(grads) - len(missing)}/{len(grads)} params", d,
                     d <= ATOL and not missing))
    for key in peer:
        if key.startswith("grad:"):
            continue
        a, b = peer[key], ours[key]
        if key in ("fwd_logits", "fwd_right_logits"):
            v = valid if key == "fwd_logits" else inputs["right_mask"].bool()
            d = (a[v] - b[v]).abs().max().item()
        elif key.endswith("logits") or key.endswith("loss") or key.startswith("scores"):
            if key.startswith("scores"):  # -inf where a processor banned a token: compare finite
                fin = torch.isfinite(a) & torch.isfinite(b)
                if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                    rows.append((key, "banned tokens differ", False))
                    continue
                a, b = a[fin], b[fin]
            d = (a - b).abs().max().item()
        else:
            eq = a.shape == b.shape and torch.equal(a, b)
            rows.append((key, "ids equal" if eq else f"ids DIFFER {a.tolist()} vs {b.tolist()}", eq))
            continue
        rows.append((key, d, d <= ATOL))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="mpt,llama,opt,gpt_neox,gptj,gpt_neo,gpt2")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--reuse", action="store_true", help="keep the original's outputs already in --work")
    ap.add_argument("--side", choices=["ours", "peer-build", "peer-load"], default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side != "ours":
        return peer_side(args.plan, args.side.split("-")[1])
    if not PEER_PYTHON.exists():
        sys.exit(f"peer_parity: no peer venv at {PEER_PYTHON}: run `bash ../shared/peer/setup.sh` first")

    work = Path(args.work or tempfile.mkdtemp(prefix="peer-parity-"))
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    jobs = []
    for family in args.families.split(","):
        if family in EXTRA_FAMILIES:
            spec = EXTRA_FAMILIES[family]
            every, layers_attr = spec["xattn_every"], spec["layers_attr"]
        else:
            spec = json.loads((FIXTURES / family / "lm_config.json").read_text())
            every, layers_attr = manifest["families"][family]["xattn_every"], None
        for xattn, immediate in settings(every):
            d = work / setting_name(family, xattn, immediate)
            d.mkdir(parents=True, exist_ok=True)
            jobs.append(dict(family=family, model_type=spec["model_type"], lm_kwargs=spec["kwargs"],
                             layers_attr=layers_attr, xattn=xattn, immediate=immediate, seed=0, work=str(d)))
    plan = work / "plan.json"
    plan.write_text(json.dumps({"jobs": jobs}))
    env = dict(os.environ, PYTHONPATH="")
    peer = [str(PEER_PYTHON), str(Path(__file__).resolve()), "--plan", str(plan)]
    if not (args.reuse and all((Path(j["work"]) / "peer_out.pt").exists() for j in jobs)):
        subprocess.run(peer + ["--side", "peer-build"], check=True, env=env)

    table, skipped = [], []
    for job in list(jobs):
        d = Path(job["work"])
        if (d / "peer_build_error.txt").exists():
            skipped.append((job, (d / "peer_build_error.txt").read_text()))
            jobs.remove(job)
            continue
        model, tokenizer = ours_build(job)
        peer_sd = torch.load(d / "peer_sd.pt")
        inputs = torch.load(d / "inputs.pt")
        rows = []
        # our tokenizer gives the original's ids
        ours_inputs = make_inputs(tokenizer, job["immediate"])
        same_ids = torch.equal(ours_inputs["input_ids"], inputs["input_ids"])
        rows.append(("tokenizer ids", "ids equal" if same_ids else "ids DIFFER", same_ids))
        ours_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        rep = key_report(ours_keys, {k: tuple(v.shape) for k, v in peer_sd.items()})
        try:
            model.load_state_dict(peer_sd, strict=True)
            rows.append(("original sd -> ours, strict=True", "ok", True))
        except RuntimeError as e:
            # The original's state_dict() also lists its alias modules (old_decoder_blocks,
            # gated_cross_attn_layers: the same tensors again); ours has no aliases.
            only_alias = not rep["only_ours"] and not rep["shape"] and all(ALIAS.match(k) for k in rep["only_peer"])
            what = f"aliases only ({len(rep['only_peer'])})" if only_alias else str(e).splitlines()[0][:90]
            rows.append(("original sd -> ours, strict=True", what, only_alias))
            model.load_state_dict({k: v for k, v in peer_sd.items() if not ALIAS.match(k)}, strict=True)
        (d / "keys.json").write_text(json.dumps(rep, indent=1))
        # The released flow: backbones from their own files (the LM directory; the vision weights
        # stand in for open_clip's pretrained ones), then checkpoint.pt with strict=False.
        from flamingo_vlm.modeling.vision import load_open_clip_state_dict

        fresh, _ = ours_build(job, seed=7)
        load_open_clip_state_dict(fresh.vision_encoder, peer_sd)
        fresh.load_state_dict(torch.load(d / "peer_checkpoint.pt"), strict=False)
        ours = run_cases(model, inputs, {"allow_image_tokens": True})
        # (right-padded: the original's left-padded batch is wrong for absolute positions)
        with torch.no_grad():
            a = fresh(inputs["vision_x"], inputs["right_ids"], inputs["right_mask"]).logits
        v = inputs["right_mask"].bool()
        ckpt_keys = torch.load(d / "peer_checkpoint.pt").keys()
        head = [k for k in peer_sd if k.endswith(("lm_head.weight", "embed_out.weight"))]
        cols = slice(None)
        if head and head[0] not in ckpt_keys:
            # an untied head is not in the original's checkpoints: its added-token rows are random on
            # every load, in the original too (ours warns); compare the base vocabulary's logits
            cols = slice(0, BASE_VOCAB)
        ref = torch.load(d / "peer_out.pt")["fwd_right_logits"]
        d_ckpt = (a[v][:, cols] - ref[v][:, cols]).abs().max().item()
        what = "original's checkpoint.pt -> ours" + (" (base vocab)" if cols.stop else "")
        rows.append((what, d_ckpt, d_ckpt <= ATOL))
        del fresh
        torch.save(ours, d / "ours_out.pt")
        torch.save(model.state_dict(), d / "ours_sd.pt")
        peer_out = torch.load(d / "peer_out.pt")
        if not job["immediate"]:
            # the documented bug: report the text-first prompt's positions apart
            a, b = peer_out.pop("pre_image_logits"), ours.pop("pre_image_logits")
            ids = inputs["pre_image_ids"][0]
            before = torch.cumsum(ids == tokenizer.convert_tokens_to_ids("<image>"), 0) == 0
            rows.append(("pre-image tokens (known OF bug)", (a - b)[0, before].abs().max().item(), True))
            rows.append(("  after the first image", (a - b)[0, ~before].abs().max().item(), None))
            d = (peer_out.pop("pre_image_logits_fixed") - b).abs().max().item()
            rows.append(("text-first vs original with bug fixed", d, d <= ATOL))
        if job["family"] in ABSOLUTE_POSITIONS:
            # the original's padded batch is wrong there: ours' padded rows against its rows alone
            valid = inputs["attention_mask"].bool()
            own = max((peer_out["fwd_logits"][r, valid[r]] - peer_out[f"single{r}_logits"][0, -n:]).abs().max().item()
                      for r, n in enumerate(valid.sum(1).tolist()))
            rows.append(("original padded vs its rows alone (known OF bug)", own, None))
            for r, n in enumerate(valid.sum(1).tolist()):
                d = (ours["fwd_logits"][r, valid[r]] - peer_out[f"single{r}_logits"][0, -n:]).abs().max().item()
                rows.append((f"fwd row {r} (padded) vs original alone", d, d <= ATOL))
            for r in (0, 1):
                for case, alone in (("greedy2", "greedy1"), ("beam3_b2", "beam3")):
                    eq = ours[case][r].tolist() == peer_out[f"{alone}_row{r}"][0].tolist()
                    rows.append((f"{case} row {r} vs original alone", "ids equal" if eq else "ids DIFFER", eq))
            for key in BATCH_CASES:
                peer_out.pop(key, None)
        compare(peer_out, ours, inputs, rows)
        table.append((setting_name(job["family"], job["xattn"], job["immediate"]), rows, rep))

    plan.write_text(json.dumps({"jobs": jobs}))  # (less the families the original cannot run)
    subprocess.run(peer + ["--side", "peer-load"], check=True, env=env)
    for (name, rows, rep), job in zip(table, jobs):
        d = Path(job["work"])
        load = json.loads((d / "peer_load.json").read_text())
        ok = load["strict"] == "ok" or (not load["unexpected"] and all(ALIAS.match(k) for k in load["missing"]))
        what = load["strict"] if load["strict"] == "ok" else (
            f"aliases only ({len(load['missing'])})" if ok else load["strict"][:90])
        rows.append(("ours sd -> original, strict=True", what, ok))
        back = torch.load(d / "peer_from_ours.pt")
        inputs = torch.load(d / "inputs.pt")
        ref = torch.load(d / "peer_out.pt")
        valid = inputs["attention_mask"].bool()
        key = "single0_logits" if job["family"] in ABSOLUTE_POSITIONS else "fwd_logits"
        dd = (back[key] - ref[key]).abs().max().item() if key != "fwd_logits" else \
            (back[key][valid] - ref[key][valid]).abs().max().item()
        rows.append((f"original on ours' sd: {key}", dd, dd <= ATOL))

    bad = 0
    for name, rows, rep in table:
        print(f"\n## {name}")
        if any(rep.values()):
            print(f"   keys only in the original: {len(rep['only_peer'])} (e.g. {rep['only_peer'][:2]}), "
                  f"only in ours: {len(rep['only_ours'])} (e.g. {rep['only_ours'][:2]}), shape: {rep['shape'][:3]}")
        for what, val, ok in rows:
            v = f"{val:.2e}" if isinstance(val, float) else val
            mark = "" if ok is None else ("ok" if ok else "FAIL")
            bad += ok is False
            print(f"   {what:46s} {v:>14}  {mark}")
    # summary: max |diff| per comparison over all settings
    summary = {}
    for name, rows, rep in table:
        for what, val, ok in rows:
            key = re.sub(r"(single|_row|row )\d", r"\1*", what.split(",")[0])
            summary.setdefault(key, []).append((val, ok, name))
    print("\n## summary over all settings (max |diff|, or what ids/keys did)")
    for key, vals in summary.items():
        floats = [v for v, _, _ in vals if isinstance(v, float)]
        if floats:
            shown = f"{max(floats):.1e}"
        else:
            kinds = sorted({re.sub(r" \(\d+\)", "", v.split(" [")[0]) for v, _, _ in vals})
            shown = " / ".join(k[:30] for k in kinds)
        bad_here = sum(ok is False for _, ok, _ in vals)
        print(f"   {key:46s} {shown:>20}  {len(vals)} cases{'' if not bad_here else f', {bad_here} FAIL'}")
    for job, error in skipped:
        print(f"\n## {setting_name(job['family'], job['xattn'], job['immediate'])}: the original fails: {error[:200]}")
    print(f"\nwork dir: {work}; {bad} failing comparison(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
