"""Procedurally drawn scenes: a benchmark and training data that need no download.

Modules, each read top to bottom:

* :mod:`~flamingo_vlm.synthetic.scenes`: the scene model (:class:`Scene`: 1-4 coloured shapes and
  an optional written word; its captions, VQA questions and class label) and the seeded
  :class:`SceneGenerator` (scene ``i`` of split ``s`` comes from ``default_rng([seed, s, i])``;
  some (shape, color) pairs are held out of the training splits).
* :mod:`~flamingo_vlm.synthetic.render`: drawing a scene with PIL (:meth:`Scene.render`).
* :mod:`~flamingo_vlm.synthetic.benchmark`: :func:`write_synthetic_benchmark`, the evaluation
  datasets in the COCO/Flickr30K/VQAv2/ImageNet layouts that ``flamingo-vlm evaluate`` reads.
* :mod:`~flamingo_vlm.synthetic.episodes`: training data, :func:`write_training_shards` (pairs and
  interleaved documents) and :func:`write_episode_shards` (few-shot episodes, name binding).
* :mod:`~flamingo_vlm.synthetic.cli`: ``flamingo-vlm data synthetic-benchmark``,
  ``flamingo-vlm data synthetic-shards`` and ``flamingo-vlm data episodes``.

The same seed and settings give byte-identical files (pixels are reproducible for a given Pillow
version).
"""

from .benchmark import BENCHMARK_TASKS, write_synthetic_benchmark
from .episodes import (
    BINDING_QUERY,
    EPISODE_KINDS,
    NONCE_NAMES_EVAL,
    NONCE_NAMES_TRAIN,
    BindingEpisode,
    binding_episode,
    binding_text,
    episode_items,
    write_episode_shards,
    write_training_shards,
)
from .scenes import COLORS, POSITIONS, SHAPES, SIZES, Scene, SceneGenerator, SceneObject

__all__ = [
    "BENCHMARK_TASKS",
    "BINDING_QUERY",
    "COLORS",
    "EPISODE_KINDS",
    "NONCE_NAMES_EVAL",
    "NONCE_NAMES_TRAIN",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "BindingEpisode",
    "Scene",
    "SceneGenerator",
    "SceneObject",
    "binding_episode",
    "binding_text",
    "episode_items",
    "write_episode_shards",
    "write_synthetic_benchmark",
    "write_training_shards",
]
