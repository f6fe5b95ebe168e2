"""Result files: one JSON per (task, shots, trial), written atomically, plus a summary.

Layout of ``--out``::

    results.json                     summary: per task and shot count, the trial scores, mean, std
    results.md                       the same as markdown tables
    <task>/shots<S>_seed<seed>.json  one finished unit: scores, settings, per-sample predictions
    rices/<task>_<split>_<id>.pt     cached RICES features

A unit file exists only once its unit has finished (it is written to a temporary name and
renamed), so a rerun skips exactly the finished units whose settings match.

Every file is strict JSON: a score that does not exist (ROC-AUC of a subset with one class, an
accuracy over no queries) is NaN in Python and ``null`` in the file (Python's bare ``NaN`` is not
JSON: JavaScript's ``JSON.parse`` and other strict parsers refuse the whole file). :func:`read_unit`
turns the ``null`` scores back into NaN, and still reads files of older versions with bare ``NaN``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_file

__all__ = ["atomic_write_json", "atomic_write_text", "markdown_table", "read_unit", "scoring_notes", "strict_json", "summarize", "unit_path"]


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    # allow_nan=False: nothing non-finite slips through as a bare NaN/Infinity (strict_json made them null)
    return _atomic_write(path, lambda f: json.dump(strict_json(data), f, indent=1, default=_json_default,
                                                   allow_nan=False))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` whole, or what it held before (``results.md``, ``card.md``)."""
    return _atomic_write(path, lambda f: f.write(text))


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Write through a temporary file renamed over ``path``; a failed write (a full disk, a value
    that is not JSON) leaves ``path`` as it was and removes the temporary file."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        write(f)
    return path


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±inf; numpy's too) replaced by None, so that it
    dumps as strict JSON (``null``); containers are copied, other values kept."""
    if isinstance(data, (float, np.floating)):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    if isinstance(data, np.ndarray):
        return strict_json(data.tolist())
    return data


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def unit_path(out_dir: str | os.PathLike, task: str, shots: int, seed: int) -> Path:
    return Path(out_dir) / task / f"shots{shots}_seed{seed}.json"


def read_unit(path: str | os.PathLike) -> dict | None:
    """A unit file as the evaluation wrote it, its ``null`` scores (``score``, anything under
    ``metrics``) NaN again, as they were before writing; files with bare ``NaN`` (older versions)
    are read too. None where there is no readable unit."""
    try:
        with open(path, encoding="utf-8") as f:
            unit = json.load(f)  # (json accepts a bare NaN)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if isinstance(unit, dict):
        if "score" in unit and unit["score"] is None:
            unit["score"] = math.nan
        if isinstance(unit.get("metrics"), dict):
            unit["metrics"] = _nan_for_null(unit["metrics"])
    return unit


def _nan_for_null(metrics: dict) -> dict:
    return {k: math.nan if v is None else _nan_for_null(v) if isinstance(v, dict) else v for k, v in metrics.items()}


def summarize(units: Iterable[dict]) -> dict[str, list[dict]]:
    """``{task: [{"shots", "metric", "trials", "seeds", "mean", "stddev", "metrics": {name: mean}}]}``
    from finished unit records, shots ascending; plus ``"scoring"`` (how the scores were computed:
    ``caption_tokenizer``, ``vqa_compat``, where the units record it; and from their fingerprints
    ``quantize``/``precision`` where the model was not run in full precision, ``demo_selection``
    where demos were not drawn at random per query, ``data: synthetic`` for the synthetic benchmark's
    folders)."""
    grouped: dict[str, dict[int, list[dict]]] = {}
    for u in units:
        grouped.setdefault(u["task"], {}).setdefault(int(u["shots"]), []).append(u)
    out: dict[str, list[dict]] = {}
    for task, by_shot in grouped.items():
        rows = []
        for shots in sorted(by_shot):
            us = sorted(by_shot[shots], key=lambda u: u["trial"])
            scores = [float(u["score"]) for u in us]
            names = [k for k, v in us[0]["metrics"].items() if isinstance(v, (int, float))]
            groups = [k for k, v in us[0]["metrics"].items() if isinstance(v, dict)]  # per-type breakdowns
            rows.append({
                "shots": shots,
                "metric": us[0]["metric"],
                "trials": scores,
                "seeds": [u["seed"] for u in us],
                "mean": float(np.mean(scores)),
                "stddev": float(np.std(scores)),
                "num_samples": us[0]["num_samples"],
                "metrics": {k: float(np.mean([u["metrics"][k] for u in us])) for k in names} | {
                    g: {t: float(np.mean([u["metrics"][g][t] for u in us if t in u["metrics"].get(g, {})]))
                        for t in us[0]["metrics"][g]} for g in groups},
            })
            scoring = {k: v for u in us for k, v in (u.get("scoring") or {}).items()}
            # the model as it was run, where it is not the full-precision one, and demos not drawn at random
            # per query (the paper's RICES numbers are another table), from the units' fingerprints (so units
            # written before this was recorded say it too)
            for u in us:
                if "held_out_pairs" in u["metrics"]:  # (synthetic data; units written before it was recorded)
                    scoring["data"] = "synthetic"
                fp = u.get("fingerprint") or {}
                if fp.get("demo_selection", "random") != "random":
                    scoring["demo_selection"] = fp["demo_selection"]
                if fp.get("quantize"):
                    scoring["quantize"] = fp["quantize"]
                if fp.get("precision", "fp32") != "fp32":
                    scoring["precision"] = fp["precision"]
            if scoring:
                rows[-1]["scoring"] = scoring
        out[task] = rows
    return out


_SCORING_NOTES = {
    ("data", "synthetic"): "flamingo-vlm's synthetic scenes (`--synthetic`), not the real dataset: not "
                           "comparable with the paper's or any published number",
    ("caption_tokenizer", "python"): "captions tokenised with the pure-Python PTB tokenizer (no Java): "
                                     "CIDEr/BLEU/ROUGE may differ slightly from pycocoevalcap's",
    ("caption_tokenizer", "java"): "captions tokenised with Stanford's PTBTokenizer (Java), as pycocoevalcap does",
    ("vqa_compat", "official"): "VQA accuracy: the official leave-one-out (one human answer left out at a time)",
    ("quantize", "int8+head"): "weight-only int8 LM (its head included), cross-attention and perceiver "
                               "(`--quantize int8`), not the full-precision model",
    ("quantize", "int4"): "weight-only int4 LM, cross-attention and perceiver (`--quantize int4`), "
                          "not the full-precision model",
    ("demo_selection", "rices"): "demos chosen by image similarity (`--rices`; compare with the paper's RICES "
                                 "table, not the random-demo one)",
    ("demo_selection", "shared"): "one random demo set per trial for every query (`--demo-selection shared`; "
                                  "not OpenFlamingo's protocol)",
    ("precision", "bf16"): "weights cast to bf16 (`--precision bf16`)",
    ("precision", "fp16"): "weights cast to fp16 (`--precision fp16`)",
    ("precision", "amp_bf16"): "fp32 weights under bf16 autocast (`--precision amp_bf16`)",
    ("vqa_compat", "openflamingo"): "VQA accuracy: OpenFlamingo's leave-one-out (`--vqa-compat openflamingo`: "
                                    "without answer_id, every identical (answer, confidence) entry is left out), "
                                    "comparable with the paper's VizWiz/TextVQA numbers, not the official metric",
}


def scoring_notes(summary: dict[str, list[dict]]) -> list[str]:
    """One markdown bullet per task and scoring setting (``data``, ``caption_tokenizer``, ``vqa_compat``,
    ``quantize``, ``precision``, ``demo_selection``)."""
    lines = []
    for task, rows in summary.items():
        settings: dict[str, set] = {}
        for r in rows:
            for k, v in (r.get("scoring") or {}).items():
                settings.setdefault(k, set()).add(str(v))
        for k, values in settings.items():
            for v in sorted(values):
                lines.append(f"- {task}: {k} = `{v}`" + (f": {_SCORING_NOTES[(k, v)]}" if (k, v) in _SCORING_NOTES else ""))
    return lines


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {float(np.std(values)):.2f}"


def markdown_table(summary: dict[str, list[dict]], *, title: str | None = None, extra: dict[str, list[str]] | None = None) -> str:
    """Rows: task x metric (the headline metric, then ``extra[task]``); columns: shot counts;
    cells: mean ± std over trials."""
    shots = sorted({r["shots"] for rows in summary.values() for r in rows})
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines.append("| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " | trials | samples |")
    lines.append("|---|---|" + "---|" * len(shots) + "---|---|")
    for task, rows in summary.items():
        by_shot = {r["shots"]: r for r in rows}
        headline = rows[0]["metric"]
        names = [headline] + [m for m in (extra or {}).get(task, []) if m != headline and m in rows[0]["metrics"]]
        for name in names:
            cells = []
            for s in shots:
                r = by_shot.get(s)
                if r is None:
                    cells.append("")
                elif name == headline:
                    cells.append(_cell(r["trials"]))
                else:
                    v = r["metrics"].get(name)
                    cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}")
            trials = max(len(r["trials"]) for r in rows)
            samples = rows[0]["num_samples"]
            label = f"{task} (synthetic)" if any((r.get("scoring") or {}).get("data") == "synthetic" for r in rows) else task
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {trials} | {samples} |")
    notes = scoring_notes(summary)
    if notes:
        lines += ["", "Scoring:", ""] + notes
    return "\n".join(lines) + "\n"
