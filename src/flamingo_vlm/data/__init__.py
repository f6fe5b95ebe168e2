"""Training data: LAION-style image-text pairs, MMC4-style interleaved documents, and your own data.

* :class:`DatasetSpec` / :class:`ShardDataset` / :func:`build_datasets`: deterministic, resumable,
  rank-split batches (``vision_x``, ``input_ids``, ``attention_mask``, ``labels``) from webdataset
  shards;
* :func:`make_labels`: the Flamingo training labels (vectorised);
* :func:`write_shards` / :func:`inspect_shards`: JSONL or image/caption folders -> shards, and a
  summary of shards; :func:`add_data_subcommand` adds ``flamingo-vlm data write|inspect``.
"""

from __future__ import annotations

from ..lazy import lazy_names

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

_LAZY = {
    "add_data_subcommand": ".custom",
    "inspect_shards": ".custom",
    "write_shards": ".custom",
    "DatasetSpec": ".dataset",
    "ShardDataset": ".dataset",
    "build_datasets": ".dataset",
    "IGNORE_INDEX": ".labels",
    "make_labels": ".labels",
    "expand_urls": ".shards",
}

# Loaded on first use (flamingo_vlm.lazy): the command line's parser imports .custom, which needs no torch.
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
