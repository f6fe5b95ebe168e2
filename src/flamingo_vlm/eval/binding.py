"""In-context name binding: can the model learn a made-up word for an object from the prompt alone?

An episode (:func:`flamingo_vlm.synthetic.binding_episode`) gives ``ways`` categories made-up
names from a held-out list (``"<image>This is a mott.<|endofchunk|>"``), shows ``shots``
demonstrations, then a new image of one category followed by ``"This is a"``. The model's answer
is the name with the highest log-likelihood among the episode's names (chance: ``1/ways``). With
fewer shots than ways, some names are never shown, so accuracy can only rise with shots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..processing import EOC_TOKEN, MEDIA_TOKEN, FlamingoProcessor
from ..synthetic import SceneGenerator, binding_episode, binding_text
from .task_kinds import continuation_ids

__all__ = ["BindingResult", "binding_prompt", "evaluate_binding"]


@dataclass
class BindingResult:
    shots: int
    ways: int
    episodes: int
    accuracy: float
    chance: float


def binding_prompt(episode) -> str:
    """Demonstrations joined with ``"\n"``, as the captioning and VQA prompts are."""
    demos = "".join(f"{MEDIA_TOKEN}{binding_text(name)}{EOC_TOKEN}\n" for _, name in episode.demos)
    return demos + MEDIA_TOKEN + binding_text()


def _candidate_names(episodes) -> list[str]:
    return sorted({n for ep in episodes for n in ep.names})


@torch.no_grad()
def evaluate_binding(
    model,
    image_processor,
    tokenizer,
    *,
    shots: int = 2,
    ways: int = 2,
    episodes: int = 100,
    generator: SceneGenerator | None = None,
    split: str = "test",
    image_size: int = 224,
    batch_size: int = 8,
    progress: bool = False,
) -> BindingResult:
    """Accuracy over ``episodes`` episodes (the same episodes for a given generator, shots and ways)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    gen = generator or SceneGenerator(seed=1)
    processor = FlamingoProcessor(tokenizer, image_processor)
    dtype = next(model.perceiver.parameters()).dtype
    correct = 0
    starts = range(0, episodes, batch_size)
    if progress:
        from ..progress import progress as tqdm

        starts = tqdm(starts, desc=f"binding {ways}-way {shots}-shot", unit="batch", leave=False)
    for start in starts:
        eps = [binding_episode(gen, i, ways=ways, shots=shots, split=split) for i in range(start, min(start + batch_size, episodes))]
        samples = [(binding_prompt(ep), [sc.render(image_size) for sc, _ in ep.demos] + [ep.query.render(image_size)])
                   for ep in eps]
        batch = processor(samples)
        # One candidate list for the whole batch (the union of names); each row reads its own names.
        names = _candidate_names(eps)
        anchor = binding_text()
        candidates = [continuation_ids(tokenizer, anchor, f" {n}") for n in names]
        scores = model.score(batch["vision_x"].to(model.device, dtype), batch["input_ids"].to(model.device), candidates,
                             batch["attention_mask"].to(model.device))
        for row, ep in enumerate(eps):
            cols = [names.index(n) for n in ep.names]
            pick = ep.names[int(np.argmax(scores[row, cols].float().cpu().numpy()))]
            correct += int(pick == ep.answer)
    return BindingResult(shots, ways, episodes, correct / episodes, 1.0 / ways)
