"""Procedurally drawn scenes: a benchmark and training data that need no download.

Modules, each read top to bottom and importing only those above it in this list (and
:mod:`flamingo_vlm.data`, below the package, whose ``write_shards`` the writers use):

* :mod:`~flamingo_vlm.synthetic.render`: what can be drawn (shapes, colours, sizes, positions) and
  drawing a scene with PIL, plainly or in a :class:`~flamingo_vlm.synthetic.render.Style`
  (outlines, textured fills and backgrounds, blur, sizes).
* :mod:`~flamingo_vlm.synthetic.scenes`: the scene model (:class:`Scene`: 1-4 coloured shapes and
  an optional written word; its captions, VQA questions and class label) and the seeded
  :class:`SceneGenerator` (scene ``i`` of split ``s`` comes from ``default_rng([seed, s, i])``;
  some (shape, color) pairs are held out of the training splits).
* :mod:`~flamingo_vlm.synthetic.icl`: in-context episodes whose answer format only their
  demonstrations show (many phrasings, answer maps, framings, drawing styles; held-out values for
  evaluation): :func:`icl_episode`, :func:`write_icl_shards`, :func:`write_icl_benchmark`.
* :mod:`~flamingo_vlm.synthetic.benchmark`: :func:`write_synthetic_benchmark`, the evaluation
  datasets in the COCO/Flickr30K/VQAv2/ImageNet layouts that ``flamingo-vlm evaluate`` reads, and
  the ``synthetic_icl`` episodes.
* :mod:`~flamingo_vlm.synthetic.episodes`: training data, :func:`write_training_shards` (pairs and
  interleaved documents) and :func:`write_episode_shards` (few-shot episodes, name binding).
* :mod:`~flamingo_vlm.synthetic.cli`: ``flamingo-vlm data synthetic-benchmark``,
  ``synthetic-shards``, ``episodes`` and ``icl-episodes`` (registered by the top-level CLI).

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
from .icl import QUESTION_TYPES, AnswerMap, IclEpisode, icl_episode, write_icl_benchmark, write_icl_shards
from .render import Style
from .scenes import COLORS, POSITIONS, SHAPES, SIZES, Scene, SceneGenerator, SceneObject

__all__ = [
    "BENCHMARK_TASKS",
    "BINDING_QUERY",
    "COLORS",
    "EPISODE_KINDS",
    "NONCE_NAMES_EVAL",
    "NONCE_NAMES_TRAIN",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "AnswerMap",
    "BindingEpisode",
    "IclEpisode",
    "Scene",
    "SceneGenerator",
    "SceneObject",
    "Style",
    "binding_episode",
    "binding_text",
    "episode_items",
    "icl_episode",
    "write_episode_shards",
    "write_icl_benchmark",
    "write_icl_shards",
    "write_synthetic_benchmark",
    "write_training_shards",
]
