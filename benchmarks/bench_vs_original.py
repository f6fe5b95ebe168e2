#!/usr/bin/env python
"""flamingo-vlm side by side with the original OpenFlamingo, on the same machine, in one run.

Both sides are built through the same drop-in call, ``flamingo_vlm.create_model_and_transforms``:
ours from ``src/``, the original through ``../shared/peer``'s shim (its own venv, see its README).
Model: ViT-B/32-shaped open_clip encoder + MPT-style LM (d_model 768, 12 layers, 12 heads), random
weights, OpenFlamingo's perceiver; the tokenizer of ``../shared/reference/openflamingo-tf4.33``.

Cases (each side and precision in a fresh process, so its peak memory is its own):

* ``decode``: 32-token greedy ``generate`` at batch 1 and 4, 3 images, the peer's 54-token prompt,
  LM vocab 400, cross-attention every layer (the shape of issue 27's table).
* ``forward``: ``model(vision_x, lang_x, attention_mask, labels=...)`` without gradients, batch 4 x
  256 tokens x 3 images, vocab 400.
* ``train``: one training step at bench_train.py's shape (4 x 256 tokens x 3 images; the tokenizer's
  vocabulary padded to 50277 entries so the LM is MPT-125M-sized, vocab ~50k): ours through
  ``flamingo_vlm.train.Trainer`` (its defaults: chunked loss, lean backward, machine-chosen kernels,
  fused AdamW, new-token rows only); the original as its ``train_one_epoch`` does it (forward with
  labels, backward, clip 1.0, AdamW over what its factory leaves trainable, which includes the whole
  input embedding). ``fp32`` and ``amp_bf16`` (bf16 autocast).

Precisions: ``fp32`` and ``bf16`` (``model.to(torch.bfloat16)`` for decode/forward; autocast for train).
Median of ``--reps`` timed runs after one warm-up (``--warmup 0``: none); peak RSS of each process; the CPU time other
processes used during the timed runs (``others``: the machine is shared; figures taken while
others >= 0.25 cores are not quiet).

    PYTHONPATH=src python benchmarks/bench_vs_original.py                    # all cases, fp32 + bf16
    PYTHONPATH=src python benchmarks/bench_vs_original.py --cases train --precisions fp32
    PYTHONPATH=src python benchmarks/bench_vs_original.py --sides ours       # no peer venv needed
    PYTHONPATH=src python benchmarks/bench_vs_original.py --cases train --allocator both   # tcmalloc on both sides
    PYTHONPATH=src python benchmarks/bench_vs_original.py --cases train --gradient-checkpointing lm   # ours with that option

Allocator: our side runs with the allocator the ``flamingo-vlm`` command uses (tcmalloc where
installed, :mod:`flamingo_vlm.allocator`), the original with the system's, as each one's users get
it; ``--allocator both|none`` makes them the same. The header says which ran with which.

``--gradient-checkpointing lm|all`` trains our side with ``model.gradient_checkpointing: lm`` / ``true``
(less memory for more time; the original as always); the rows and the file name say so.

Writes ``benchmarks/results/vs-original-<cases>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = (REPO / ".." / "shared" / "peer").resolve()
FIXTURE = (REPO / ".." / "shared" / "reference" / "openflamingo-tf4.33").resolve()
PEER_PY = Path(os.environ.get("PEER_VENV", Path.home() / ".cache" / "peer" / "venv")) / "bin" / "python"
PROMPT = ("<image>A photo of a red square and a blue circle.<|endofchunk|>"
          "<image>Two green triangles next to a yellow star.<|endofchunk|><image>A photo of")
CASES = ("decode", "forward", "train")
TARGET = 2.0  # issue 27: >= 2x faster than the original at the same precision
MEMORY_TARGET = 0.6  # training: peak memory <= 60% of the original's


# -- the child: runs in either venv and imports only flamingo_vlm's drop-in API ------------------------
class Others:
    """CPU cores used by other processes over an interval (/proc/stat minus this process)."""

    def __init__(self):
        self.hz, self.t0 = os.sysconf("SC_CLK_TCK"), time.perf_counter()
        self.b0, self.s0 = self._snap()

    @staticmethod
    def _snap():
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(x) for i, x in enumerate(f[:8]) if i not in (3, 4))
        t = os.times()
        return busy, t.user + t.system

    def cores(self):
        b, s = self._snap()
        return max(0.0, ((b - self.b0) / self.hz - (s - self.s0)) / (time.perf_counter() - self.t0))


def _tokenizer_dir(work: str, vocab: int) -> str:
    """The fixture's tokenizer, its BPE vocabulary padded with unreachable entries to ``vocab``."""
    src = FIXTURE / "tokenizer"
    if vocab <= 400:
        return str(src)
    d = json.loads((src / "tokenizer.json").read_text())
    v = d["model"]["vocab"]
    for i in range(len(v), vocab):
        v[f"<pad{i}>"] = i
    out = Path(work) / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(d))
    shutil.copy(src / "tokenizer_config.json", out)
    return str(out)


def _build(vocab: int, every: int = 1):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import flamingo_vlm

    work = tempfile.mkdtemp()
    vit = dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
               text_cfg=dict(context_length=8, vocab_size=64, width=64, heads=2, layers=1))
    Path(work, "vit.json").write_text(json.dumps(vit))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mpt", d_model=768, n_layers=12, n_heads=12, vocab_size=vocab, max_seq_len=2048)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(os.path.join(work, "lm"))
    model, _, tok = flamingo_vlm.create_model_and_transforms(
        clip_vision_encoder_path=os.path.join(work, "vit.json"), clip_vision_encoder_pretrained=None,
        lang_encoder_path=os.path.join(work, "lm"), tokenizer_path=_tokenizer_dir(work, vocab),
        cross_attn_every_n_layers=every)
    return model, tok


def _batch(tok, rows=4, length=256, images=3, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    media, eoc = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<|endofchunk|>")
    ids = torch.randint(1, 400, (rows, length), generator=g)
    chunk = length // images
    for i in range(images):
        if i:
            ids[:, i * chunk - 1] = eoc
        ids[:, i * chunk] = media
    labels = ids.masked_fill(ids == media, -100)
    vision_x = torch.randn(rows, images, 1, 3, 224, 224, generator=g)
    return vision_x, ids, torch.ones_like(ids), labels


def _timed(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    load, times = Others(), []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, load.cores()


def child(side: str, case: str, precision: str, reps: int, warmup: int = 1) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    bf16 = precision == "bf16"
    out = {}
    if case in ("decode", "forward"):
        model, tok = _build(400)
        model.eval()
        dt = torch.bfloat16 if bf16 else torch.float32
        model.to(dt)
        if case == "decode":
            for rows in (1, 4):
                tok.padding_side = "left"
                enc = tok([PROMPT] * rows, return_tensors="pt", padding=True)
                vx = torch.randn(rows, 3, 1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(dt)
                kw = dict(max_new_tokens=32, min_new_tokens=32, pad_token_id=tok.pad_token_id)
                with torch.no_grad():
                    times, others = _timed(lambda: model.generate(vx, enc["input_ids"], attention_mask=enc["attention_mask"], **kw), reps, warmup)
                out[f"decode b{rows}"] = {"s": statistics.median(times), "runs": times, "others": others}
        else:
            vx, ids, mask, labels = _batch(tok)
            vx = vx.to(dt)
            with torch.no_grad():
                times, others = _timed(lambda: model(vx, ids, attention_mask=mask, labels=labels)[0], reps, warmup)
            out["forward+loss 4x256"] = {"s": statistics.median(times), "runs": times, "others": others}
    else:
        model, tok = _build(50277)
        step = _ours_step(model, tok, bf16) if side == "ours" else _original_step(model, tok, bf16)
        times, others = _timed(step, reps, warmup)
        gc = os.environ.get("BENCH_OURS_GC", "") if side == "ours" else ""
        name = "train step 4x256" + (f" (ours: gradient_checkpointing {'lm' if gc == 'lm' else 'true'})" if gc else "")
        out[name] = {"s": statistics.median(times), "runs": times, "others": others}
    for v in out.values():
        v["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if side == "ours":
        from flamingo_vlm.modeling import kernels

        out["_kernels"] = kernels.summary()
    return out


def _original_step(model, tok, bf16):
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vx, ids, mask, labels = _batch(tok)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(vx, ids, attention_mask=mask, labels=labels)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _ours_step(model, tok, bf16):
    from flamingo_vlm.train import TrainConfig, Trainer

    vx, ids, mask, labels = _batch(tok)

    class Batches:
        def __iter__(self):
            while True:
                yield {"vision_x": vx, "input_ids": ids, "attention_mask": mask, "labels": labels}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    out = tempfile.mkdtemp()
    gc = {"": False, "lm": "lm", "all": True}[os.environ.get("BENCH_OURS_GC", "")]
    cfg = TrainConfig.from_dict({
        "precision": "amp_bf16" if bf16 else "fp32", "max_steps": 1000, "checkpoint_every": 100_000,
        "model": {"gradient_checkpointing": gc},
        "output_dir": out, "schedule": {"warmup_steps": 0}, "progress": False, "export": False,
        "tensorboard": False, "plot": False,
        # what `flamingo-vlm train` does for the model it builds (off by default for models passed in)
        **({"frozen_bf16": True} if bf16 else {})}, require_model=False)
    trainer = Trainer(cfg, model=model, datasets=[Batches()], loss_weights=[1.0])
    return lambda: trainer.train_step(trainer.next_batches())


def _tag(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '-' and '_' only (it names the result files)")
    return text


# -- the driver -------------------------------------------------------------------------------------
def _allocators(mode: str) -> dict[str, dict[str, str]]:
    """Environment variables that preload the allocator, per side (empty: the system's): ``ours`` preloads what the ``flamingo-vlm`` command would
    (:mod:`flamingo_vlm.allocator`: tcmalloc where installed) for our side only, the original
    running as its users run it; ``both``: for both sides; ``none``: the system's allocator for both."""
    sys.path.insert(0, str(REPO / "src"))
    from flamingo_vlm.allocator import find_tcmalloc, preload_env

    lib = None if mode == "none" else find_tcmalloc()
    env = preload_env(lib) if lib else {}
    return {"ours": env, "original": env if mode == "both" else {}}


def _run(side, case, precision, reps, preload_vars=None, gc: str = "", warmup: int = 1) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["BENCH_OURS_GC"] = gc
    env.update(preload_vars or {})
    if side == "ours":
        py = sys.executable
        env["PYTHONPATH"] = str(REPO / "src")
    else:
        py = str(PEER_PY)
        shim = Path(tempfile.mkdtemp()) / "flamingo_vlm"
        shim.mkdir()
        shutil.copy(PEER / "shim_init.py", shim / "__init__.py")
        env.update(PYTHONPATH=str(shim.parent), PEER_TOOLS=str(PEER))
    cmd = [py, __file__, "--child", side, case, precision, str(reps), str(warmup)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench_vs_original: {side} {case} {precision} failed (exit {proc.returncode})")
    print(f"  {side} {case} {precision}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--sides", nargs="+", default=["ours", "original"], choices=("ours", "original"))
    ap.add_argument("--reps", type=int, default=2, help="timed runs after the warm-up (median)")
    ap.add_argument("--warmup", type=int, default=1, choices=(0, 1),
                    help="untimed runs first (0: for runs that take minutes, e.g. the original's bf16 step on a "
                         "CPU without bf16 instructions)")
    ap.add_argument("--tag", default="", type=_tag, help="appended to the result files' name (e.g. the CPU: avx2)")
    ap.add_argument("--allocator", default="ours", choices=("ours", "both", "none"),
                    help="preload tcmalloc (where installed) for our side only, as the flamingo-vlm command does "
                         "(ours, default), for both sides (both), or for neither (none)")
    ap.add_argument("--gradient-checkpointing", default="", choices=("lm", "all"),
                    help="train case: our side with model.gradient_checkpointing lm or true (default: off)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, case, precision, reps, warmup = args.child
        print("RESULT " + json.dumps(child(side, case, precision, int(reps), int(warmup))), flush=True)
        return 0
    if "original" in args.sides and not PEER_PY.is_file():
        raise SystemExit(f"bench_vs_original: the original's venv {PEER_PY} is missing: run `bash {PEER}/setup.sh` "
                         "(or set PEER_VENV), or pass --sides ours")
    load = os.getloadavg()
    preload = _allocators(args.allocator)
    results: dict = {}
    for case in args.cases:
        for precision in args.precisions:
            for side in args.sides:
                results[(case, precision, side)] = _run(side, case, precision, args.reps, preload[side],
                                                        args.gradient_checkpointing if case == "train" else "",
                                                        args.warmup)
    kerns = [r.pop("_kernels") for r in results.values() if "_kernels" in r]
    kern = kerns[0] if kerns else "ours not run"
    lines = [f"flamingo-vlm vs the original OpenFlamingo, same machine, same run. {kern}.",
             "Allocator: " + "; ".join(f"{side} {'tcmalloc' if preload[side] else 'system (glibc malloc)'}"
                                       for side in args.sides) + ".",
             f"{'No warm-up run' if args.warmup == 0 else 'One warm-up run'}, median of {args.reps} timed. "
             f"Load average at start {load[0]:.2f}; `others` = cores other processes used during the timed runs "
             "(>= 0.25: not a quiet figure).", "",
             "| workload | precision | ours (s) | original (s) | speed-up | ours peak RSS (GB) | original peak RSS (GB) | memory ratio | others (ours/orig) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for case in args.cases:
        for precision in args.precisions:
            ours = results.get((case, precision, "ours"), {})
            orig = results.get((case, precision, "original"), {})
            for name in (ours or orig):
                a, b = ours.get(name), orig.get(name, orig.get(name.partition(" (ours:")[0]))
                f = lambda r, k, fmt: format(r[k], fmt) if r else "—"  # noqa: E731
                speed = f"{b['s'] / a['s']:.2f}x" if a and b else "—"
                mem = f"{a['peak_rss_gb'] / b['peak_rss_gb']:.0%}" if a and b else "—"
                lines.append(f"| {name} | {precision} | {f(a, 's', '.3f')} | {f(b, 's', '.3f')} | {speed} | "
                             f"{f(a, 'peak_rss_gb', '.2f')} | {f(b, 'peak_rss_gb', '.2f')} | {mem} | "
                             f"{f(a, 'others', '.2f')}/{f(b, 'others', '.2f')} |")
    lines += ["", f"Targets: >= {TARGET:.0f}x faster at the same precision; training peak memory <= "
              f"{MEMORY_TARGET:.0%} of the original's (decode/forward memory is informative only)."]
    table = "\n".join(lines)
    print(table)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "vs-original-" + "-".join(args.cases) + ("" if args.sides == ["ours", "original"] else "-" + "-".join(args.sides))
    stem += f"-gc{args.gradient_checkpointing}" if args.gradient_checkpointing and "train" in args.cases else ""
    stem += f"-{args.tag}" if args.tag else ""
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"load_at_start": load, "kernels": kern, "allocator": preload,
                                                  "results": {"|".join(k): v for k, v in results.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
