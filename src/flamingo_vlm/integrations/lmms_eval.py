"""lmms-eval model ``flamingo_vlm``: any flamingo-vlm model, in-process, on lmms-eval's tasks.

    lmms-eval --model flamingo_vlm --model_args pretrained=smol-synthetic,device=cpu --tasks ...

or, from Python, with a model already in memory::

    lm = FlamingoVLM(model=model, image_processor=image_processor, tokenizer=tokenizer)
    lmms_eval.evaluator.simple_evaluate(model=lm, tasks=[...])

lmms-eval finds the class through the ``lmms_eval.models`` entry point in flamingo-vlm's
pyproject.toml (read by its model registry); ``register_model`` also puts it in lmms-eval's older
registry. Only this module imports lmms_eval: ``pip install --no-deps lmms-eval==0.7.3`` plus the
``lmms`` extra is enough (scripts/setup.sh).

Requests (lmms-eval's "simple" model interface):

- ``generate_until``: :meth:`Flamingo.generate`, batched by identical generation kwargs; greedy
  unless the task sets ``temperature > 0`` / ``do_sample``; ``<|endofchunk|>`` ends an answer, and
  the text is cut at the first of the task's ``until`` strings.
- ``loglikelihood`` (``loglikelihood`` and ``multiple_choice`` tasks): :meth:`Flamingo.score` gives
  the summed log-probability of the continuation's tokens, returned negated: a loss, lower for a
  likelier continuation, as lmms-eval's own models return (``loss.item()``), because lmms-eval
  0.7.3's ``multiple_choice`` picks the choice with the *lowest* value (``np.argmin(lls)``,
  EvolvingLMMs-Lab/lmms-eval#370); with log-probabilities it had picked the least likely choice.
  Its ``acc_norm`` then ranks by loss per character, as lm-eval's does by log-probability per
  character. Two of 0.7.3's paths still assume log-probabilities, for every model: the
  ``perplexity`` aggregation (``exp(-mean)``) and ``acc_mutual_info`` (``argmax``). The requests of
  one document (the choices of a multiple-choice question) share one scored context. ``is_greedy`` comes from one
  forward pass over context + continuation (``score`` returns no per-token argmax).
  lmms-eval 0.7.3's evaluator would turn these pairs into strings; constructing the model lets
  them through (:func:`_keep_loglikelihood_pairs`).
- ``generate_until_multi_round``: rounds of ``generate_until`` driven by the task's ``doc_to_text``.

Prompts: the task's context text, with one ``<image>`` per visual put in front unless the text
already has exactly one marker per visual (a Flamingo reads each image at its marker). Visuals are
images (PIL, arrays, image files); video and audio are refused. Chat templates are not applied:
flamingo-vlm models are few-shot completion models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from ..processing import MEDIA_TOKEN, FlamingoProcessor
from ..pretrained import from_pretrained

MODEL_ID = "flamingo_vlm"
CLASS_PATH = f"{__name__}.FlamingoVLM"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".gif"}
_ARGS = "pretrained, device, dtype, batch_size, max_new_tokens, local_files_only, cache_dir"


def model_manifests():
    """The ``lmms_eval.models`` entry point: how lmms-eval's registry finds this class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("flamingo-vlm",))]


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _dtype(value):
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value) not in _DTYPES:
        raise ValueError(f"flamingo_vlm: dtype={value!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[str(value)]


def _keep_loglikelihood_pairs() -> None:
    """lmms-eval 0.7.3's evaluator turns every response that is not text into its string
    (``api.instance.unwrap_generation_output``), so ``(logprob, is_greedy)`` pairs reach the tasks
    as ``"(-1.2, True)"`` and every multiple_choice / loglikelihood task fails, whatever the model.
    When that is so, let exactly such pairs through; everything else still goes to lmms-eval."""
    from lmms_eval import evaluator

    original = evaluator.unwrap_generation_output
    if original((0.0, True))[0] == (0.0, True):
        return  # a version without the problem, or already wrapped

    def unwrap_generation_output(output):
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], float) and isinstance(output[1], bool):
            return output, None
        return original(output)

    evaluator.unwrap_generation_output = unwrap_generation_output


@register_model(MODEL_ID, "flamingo-vlm")
class FlamingoVLM(lmms):
    """lmms-eval model over a flamingo-vlm model: ``pretrained`` is anything
    :func:`flamingo_vlm.load_pretrained` takes (built-in name, directory, Hub repo, OpenFlamingo
    release), or pass ``model``/``image_processor``/``tokenizer`` already loaded."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "smol-synthetic",
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 64,
        local_files_only: bool | str = False,
        cache_dir: str | None = None,
        *,
        model=None,
        image_processor=None,
        tokenizer=None,
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # simple_evaluate offers it to every model
        if kwargs:
            raise TypeError(f"flamingo_vlm: unknown model_args {', '.join(sorted(kwargs))}; accepted: {_ARGS}")
        if model is None:
            model, image_processor, tokenizer = from_pretrained(
                pretrained, device=device, dtype=_dtype(dtype), cache_dir=cache_dir,
                local_files_only=_flag(local_files_only),
            )
        elif image_processor is None or tokenizer is None:
            raise ValueError("flamingo_vlm: pass image_processor and tokenizer together with model")
        elif device is not None or dtype is not None:
            model.to(device=device, dtype=_dtype(dtype))
        if str(batch_size).strip().lower() == "auto":
            batch_size = 1
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"flamingo_vlm: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = FlamingoProcessor(tokenizer, image_processor)
        _keep_loglikelihood_pairs()

    # -- inputs --------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat, stack = [], [visuals]
        while stack:  # tasks return an image, a list of images, or nested lists
            item = stack.pop(0)
            if item is None:
                continue
            if isinstance(item, (list, tuple)):
                stack[:0] = list(item)
            else:
                flat.append(self._image(item, task, doc_id))
        return flat

    @staticmethod
    def _image(item, task, doc_id):
        if isinstance(item, (Image.Image, np.ndarray, torch.Tensor)):
            return item
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.suffix.lower() in _VIDEO_SUFFIXES:
                raise ValueError(f"flamingo_vlm: task {task} doc {doc_id} gives a video ({path}); this model takes images only")
            return path
        raise ValueError(
            f"flamingo_vlm: task {task} doc {doc_id} gives a {type(item).__name__} visual (audio?); "
            "this model takes images (PIL images, arrays or image files)"
        )

    @staticmethod
    def _prompt(context: str, n_images: int) -> str:
        markers = context.count(MEDIA_TOKEN)
        if markers == n_images:
            return context
        if markers == 0:
            return MEDIA_TOKEN * n_images + context
        raise ValueError(
            f"flamingo_vlm: the prompt has {markers} {MEDIA_TOKEN} marker(s) but the task gives {n_images} image(s); "
            f"put one {MEDIA_TOKEN} per image in doc_to_text, or none to have them all put in front"
        )

    def _batch(self, samples) -> dict[str, torch.Tensor]:
        batch = self.processor(samples)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    # -- generate_until --------------------------------------------------------------------------
    def _generate(self, samples: list[tuple[str, list]], gen_kwargs: dict | None) -> list[str]:
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.pop("temperature", 0) or 0)
        do_sample = _flag(gen.pop("do_sample", temperature > 0))
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen.pop("max_new_tokens", None) or self.max_new_tokens),
            "num_beams": int(gen.pop("num_beams", None) or 1),
            "do_sample": do_sample,
        }
        top_p = gen.pop("top_p", None)
        if do_sample:
            kwargs["temperature"] = temperature or 1.0
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        # Other task keys (image_aspect_ratio, ...) are for other model families and do not apply.
        batch = self._batch(samples)
        out = self.model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], **kwargs)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            if stop:
                texts = [t.split(stop)[0] for t in texts]
        return texts

    def generate_until(self, requests) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                samples = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    images = self._visuals(doc_to_visual, doc_id, task, split)
                    samples.append((self._prompt(context, len(images)), images))
                for i, text in zip(chunk, self._generate(samples, requests[chunk[0]].args[1])):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
        return results

    def generate_until_multi_round(self, requests) -> list:
        """Round 0 answers the task's context; each later round asks ``doc_to_text(doc,
        previous_output=..., round_idx=..., previous_round_info=...)`` for (visuals, context, done,
        outputs so far, info), as lmms-eval's LLaVA-OneVision does. Returns each request's outputs."""
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, doc_id, task, split)
            outputs = self._generate([(self._prompt(context, len(images)), images)], gen_kwargs)
            info, round_idx = None, 1
            while True:
                doc = self.task_dict[task][split][doc_id]
                visuals, context, done, outputs, info = doc_to_text(
                    doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                )
                outputs = list(outputs)
                if done:
                    break
                images = [self._image(v, task, doc_id) for v in (visuals or [])]
                outputs += self._generate([(self._prompt(context, len(images)), images)], gen_kwargs)
                round_idx += 1
            results.append(tuple(outputs))
        return results

    # -- loglikelihood ---------------------------------------------------------------------------
    def _continuation_ids(self, context: str, continuation: str) -> list[int]:
        """The continuation's tokens as they follow the context (lm-eval's split of the whole text)."""
        whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        return whole[len(self.tokenizer(context, add_special_tokens=False)["input_ids"]) :]

    @torch.no_grad()
    def _greedy(self, batch, candidates: list[list[int]]) -> list[bool]:
        """Whether greedy decoding after the context would produce each candidate."""
        ctx_ids, ctx_mask = batch["input_ids"], batch["attention_mask"]
        flags = []
        for start in range(0, len(candidates), self.batch_size):
            chunk = candidates[start : start + self.batch_size]
            longest = max(len(c) for c in chunk)
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long, device=ctx_ids.device)
            mask = torch.zeros_like(ids)
            for row, c in enumerate(chunk):
                ids[row, : len(c)] = torch.as_tensor(c)
                mask[row, : len(c)] = 1
            n = len(chunk)
            logits = self.model(
                batch["vision_x"].expand(n, *batch["vision_x"].shape[1:]),
                torch.cat([ctx_ids.expand(n, -1), ids], dim=1),
                torch.cat([ctx_mask.expand(n, -1), mask], dim=1),
            ).logits
            start_pos = ctx_ids.shape[1] - 1  # position t predicts token t+1
            for row, c in enumerate(chunk):
                predicted = logits[row, start_pos : start_pos + len(c)].argmax(-1)
                flags.append(bool((predicted == torch.as_tensor(c, device=predicted.device)).all()))
        return flags

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, str]]] = {}  # one scored context per document
        for i, request in enumerate(requests):
            if len(request.args) == 2:  # acc_mutual_info's unconditional requests: no document, no image
                context, target, doc_to_visual, doc_id, task, split = *request.args, None, None, None, None
            else:
                context, target, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(target, str):  # `loglikelihood` tasks pass doc_to_target itself
                target = str(target(self.task_dict[task][split][doc_id]))
            # Trailing context whitespace belongs to the continuation (as lm-eval encodes pairs).
            stripped = context.rstrip()
            target, context = context[len(stripped):] + target, stripped
            groups.setdefault((context, doc_to_visual, doc_id, task, split), []).append((i, target))
        for (context, doc_to_visual, doc_id, task, split), items in groups.items():
            images = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(images))
            batch = self._batch([(prompt, images)])
            candidates = [self._continuation_ids(prompt, target) for _, target in items]
            if any(not c for c in candidates):
                raise ValueError(f"flamingo_vlm: task {task} doc {doc_id} has an empty continuation to score")
            scores = self.model.score(batch["vision_x"], batch["input_ids"], candidates, batch["attention_mask"])[0]
            greedy = self._greedy(batch, candidates)
            for (i, target), score, is_greedy in zip(items, scores.tolist(), greedy):
                results[i] = (-float(score), is_greedy)  # a loss: lmms-eval ranks choices by argmin (module doc)
                self.cache_hook.add_partial("loglikelihood", (context, target), results[i])
        return results
