"""Training data: LAION-style image-text pairs, MMC4-style interleaved documents, and your own data.

* :class:`DatasetSpec` / :class:`ShardDataset` / :func:`build_datasets`: deterministic, resumable,
  rank-split batches (``vision_x``, ``input_ids``, ``attention_mask``, ``labels``) from webdataset
  shards;
* :func:`make_labels`: the Flamingo training labels (vectorised);
* :func:`write_shards` / :func:`inspect_shards`: JSONL or image/caption folders -> shards, and a
  summary of shards; :func:`add_data_subcommand` adds ``flamingo-vlm data write|inspect``.
"""

from .custom import add_data_subcommand, inspect_shards, write_shards
from .dataset import DatasetSpec, ShardDataset, build_datasets
from .labels import IGNORE_INDEX, make_labels
from .shards import expand_urls

__all__ = [
    "IGNORE_INDEX",
    "DatasetSpec",
    "ShardDataset",
    "add_data_subcommand",
    "build_datasets",
    "expand_urls",
    "inspect_shards",
    "make_labels",
    "write_shards",
]
