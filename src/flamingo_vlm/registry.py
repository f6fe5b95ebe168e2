"""Named models: the released OpenFlamingo checkpoints (data only; building lives elsewhere).

Each entry names its backbones and cross-attention interval, as OpenFlamingo's README does, plus
the LM architecture as a config so tests can build every release on the meta device offline;
then the models shipped in this package, and :func:`model_source`, which says which of these (or a
local directory, or a Hub repo in our format) a model name means. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class OpenFlamingoRelease:
    repo_id: str
    lang_encoder: str
    tokenizer: str
    cross_attn_every_n_layers: int
    lm_config: dict = field(default_factory=dict)  # the LM's config.json (model_type included)
    vision: str = "ViT-L-14"
    vision_pretrained: str = "openai"
    checkpoint_file: str = "checkpoint.pt"
    # Released weights were trained on ViT tokens before ln_post (open_clip <= 2.22).
    vision_tokens_ln_post: bool = False
    paper_coco_4shot: float | None = None
    paper_vqav2_4shot: float | None = None


# The LMs' config.json as the Hub has them (what lm_loading.causal_lm_from_config builds, offline).
# mpt-1b-redpajama-200b(-dolly): MosaicGPT (remote code, April 2023); the model card: 24 layers, 16 heads,
# width 2048, ALiBi, QK LayerNorm, no biases, sequence length 2048. Keys as MosaicGPTConfig writes them.
_MOSAIC_GPT_1B = {"model_type": "mosaic_gpt", "d_model": 2048, "n_heads": 16, "n_layers": 24, "mlp_ratio": 4,
                  "max_seq_len": 2048, "vocab_size": 50432, "alibi": True, "alibi_bias_max": 8,
                  "attn_qk_ln": True, "attn_clip_qkv": None, "softmax_scale": None, "logit_scale": None,
                  "no_bias": True, "prefix_lm": False, "attn_uses_sequence_id": False, "attn_impl": "torch",
                  "attn_pdrop": 0.0, "resid_pdrop": 0.0, "emb_pdrop": 0.0, "embedding_fraction": 1.0,
                  "low_precision_layernorm": True}
# anas-awadalla/mpt-7b: llm-foundry MPT (model_type "mpt"), May 2023.
_MPT_7B = {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4,
           "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "logit_scale": None,
           "norm_type": "low_precision_layernorm", "learned_pos_emb": True, "emb_pdrop": 0, "resid_pdrop": 0,
           "embedding_fraction": 1.0,
           "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                           "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                           "prefix_lm": False, "qk_ln": False, "softmax_scale": None}}
_RPJ_3B = {"model_type": "gpt_neox", "hidden_size": 2560, "num_attention_heads": 32, "num_hidden_layers": 32,
           "intermediate_size": 10240, "vocab_size": 50432, "rotary_pct": 1.0, "use_parallel_residual": False,
           "tie_word_embeddings": False, "max_position_embeddings": 2048}

OPENFLAMINGO_RELEASES: dict[str, OpenFlamingoRelease] = {
    r.repo_id: r
    for r in [
        OpenFlamingoRelease("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b",
                            "anas-awadalla/mpt-1b-redpajama-200b", 1, _MOSAIC_GPT_1B, paper_coco_4shot=77.3, paper_vqav2_4shot=45.8),
        OpenFlamingoRelease("openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
                            "anas-awadalla/mpt-1b-redpajama-200b-dolly", "anas-awadalla/mpt-1b-redpajama-200b-dolly", 1,
                            _MOSAIC_GPT_1B, paper_coco_4shot=82.7, paper_vqav2_4shot=45.7),
        OpenFlamingoRelease("openflamingo/OpenFlamingo-4B-vitl-rpj3b", "togethercomputer/RedPajama-INCITE-Base-3B-v1",
                            "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, _RPJ_3B, paper_coco_4shot=81.8, paper_vqav2_4shot=49.0),
        OpenFlamingoRelease("openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
                            "togethercomputer/RedPajama-INCITE-Instruct-3B-v1", "togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2,
                            _RPJ_3B, paper_coco_4shot=85.8, paper_vqav2_4shot=49.0),
        OpenFlamingoRelease("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", "anas-awadalla/mpt-7b", 4,
                            _MPT_7B, paper_coco_4shot=89.0, paper_vqav2_4shot=54.8),
    ]
}
# The GPT-NeoX tokenizer these LMs share has 50277 tokens; OpenFlamingo adds 3 (eoc, image, pad).
OPENFLAMINGO_TOKENIZER_LEN = 50277


def get_release(name: str) -> OpenFlamingoRelease | None:
    return OPENFLAMINGO_RELEASES.get(name)


#: Packaged backbones are named ``"builtin:<name>"`` (:mod:`flamingo_vlm.backbones`).
BUILTIN_PREFIX = "builtin:"


def is_builtin(name) -> bool:
    """Whether ``name`` names a packaged backbone (``"builtin:..."``)."""
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


# -- models that ship inside this package ------------------------------------------------------------
#: The model every command uses when none is named: trained by us, needs no network (see its model card,
#: ``src/flamingo_vlm/models/smol-synthetic/README.md``).
DEFAULT_MODEL = "smol-synthetic"
BUILTIN_MODELS: dict[str, str] = {"smol-synthetic": "models/smol-synthetic"}  # relative to the package


def builtin_model_dir(name: str):
    """The directory of a built-in model, or None when ``name`` is not one."""
    rel = BUILTIN_MODELS.get(str(name))
    return None if rel is None else Path(__file__).resolve().parent / rel


# -- whole models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """What a model name passed to ``from_pretrained`` means.

    ``kind``: ``"builtin"`` (a model shipped in this package; ``path`` is its directory),
    ``"release"`` (a released OpenFlamingo repo; ``release`` says how to build it), ``"directory"``
    (a local directory in our format) or ``"hub"`` (a Hub repo in our format, downloaded on load)."""

    kind: str
    name: str
    path: Path | None = None
    release: OpenFlamingoRelease | None = None


def model_source(name_or_path: str | Path) -> ModelSource:
    """A local directory wins over a built-in model or release of the same name."""
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return ModelSource("directory", name, Path(name).expanduser())
    builtin = builtin_model_dir(name)
    if builtin is not None:
        return ModelSource("builtin", name, builtin)
    release = get_release(name)
    if release is not None:
        return ModelSource("release", name, release=release)
    return ModelSource("hub", name)
