"""Loading causal LMs, including the MosaicGPT checkpoints behind OpenFlamingo-3B.

- ``model_type: mosaic_gpt`` (``anas-awadalla/mpt-1b-redpajama-200b(-dolly)``, remote code that current
  transformers cannot run): the config is translated to an ``MptConfig`` and the weights renamed to
  MPT's module names, then loaded (strictly) into :class:`~.modeling.mpt.MosaicMptForCausalLM`.
  No remote code is run.
- ``model_type: mpt``: loaded into the same class, because transformers' own ``MptForCausalLM``
  ignores ``qk_ln``, ``alibi_bias_max``, ``logit_scale``, ``no_bias=false`` and ``expansion_ratio``.
  A directory that class saved (``architectures: ["MptForCausalLM"]``) is the exception: its
  weights are what that class computes, so it runs as that class does (:func:`_as_transformers_mpt`).
- anything else: ``AutoModelForCausalLM.from_pretrained`` (transformers honours its own configs).

Rule: a setting of the source config that changes the math is honoured, or refused with an error
naming it (:class:`UnsupportedLMConfig`); it is never dropped. The verdict for every MosaicGPT and
MPT config key is in :data:`MOSAIC_GPT_RULES` / :data:`MPT_RULES` / :data:`MPT_ATTN_RULES`, and the
reasoning in ``docs/lm-config-audit.md``. Keys in no table are ignored by MosaicML's own code
too (they only reach ``PretrainedConfig``); they are logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


class UnsupportedLMConfig(ValueError):
    """A source-model setting that changes the model's math and that we do not implement."""


# -- the audit ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    verdict: str  # "honoured" | "irrelevant" | "refused" (only the values `refuse` returns True for)
    note: str
    refuse: Callable[[Any], bool] | None = None
    bad: Any = None  # a value that is refused (the tests try each)


def _honoured(note: str, refuse=None, bad=None) -> Rule:
    return Rule("honoured", note, refuse, bad)


def _irrelevant(note: str) -> Rule:
    return Rule("irrelevant", note)


def _refused(note: str, refuse, bad) -> Rule:
    return Rule("refused", note, refuse, bad)


_INIT = _irrelevant("initialisation only; weights come from the checkpoint")
_RUNTIME = _irrelevant("runtime/logging option; no effect on the outputs")
_DROPOUT_TRAIN = _honoured("dropout, training mode only")
_TRAIN_ONLY = _irrelevant("training-time only and not applied by us (0 / 1.0 in every released MosaicGPT/MPT); "
                          "the forward pass is the same")

# PretrainedConfig bookkeeping, present in any config.json.
GENERIC_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "return_dict",
    "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type", "name", "loss_fn",
    "tokenizer_name", "tokenizer_class", "custom_pipelines", "_commit_hash", "use_return_dict",
}

MOSAIC_GPT_RULES: dict[str, Rule] = {
    "d_model": _honoured("width"),
    "n_heads": _honoured("attention heads"),
    "n_layers": _honoured("decoder blocks"),
    "max_seq_len": _honoured("longer sequences (prompt + cache) are an error, as in MosaicGPT"),
    "vocab_size": _honoured("embedding rows"),
    "mlp_ratio": _honoured("MLP width mlp_ratio * d_model (transformers' MPT is always 4x)"),
    "alibi": _refused("false means learned position embeddings (transformer.wpe), not implemented",
                      lambda v: not v, False),
    "alibi_bias_max": _honoured("ALiBi slopes, MosaicGPT formula (transformers hard-codes 8)"),
    "attn_qk_ln": _honoured("LayerNorm of q and k over d_model after Wqkv (transformers drops it)"),
    "attn_clip_qkv": _honoured("clamp of Wqkv's output"),
    "softmax_scale": _honoured("attention score scale (default 1/sqrt(head_dim))"),
    "logit_scale": _honoured("logits multiplied by it; 'inv_sqrt_d_model' = 1/sqrt(d_model)",
                             lambda v: isinstance(v, str) and v != "inv_sqrt_d_model", "inv_d_model"),
    "no_bias": _honoured("false: biases in every Linear and LayerNorm (transformers' MPT has none)"),
    "prefix_lm": _refused("bidirectional attention over a prefix given by a prefix_mask input; not implemented",
                          bool, True),
    "attn_uses_sequence_id": _irrelevant("only acts on a sequence_id input (packed training data); "
                                         "nothing here passes one, nor did OpenFlamingo"),
    "attn_impl": _irrelevant("torch/flash/triton kernels of the same attention; we use torch SDPA"),
    "attn_pdrop": _DROPOUT_TRAIN,
    "resid_pdrop": _DROPOUT_TRAIN,
    "emb_pdrop": _TRAIN_ONLY,
    "embedding_fraction": _TRAIN_ONLY,
    "low_precision_layernorm": _irrelevant("same LayerNorm; only under autocast did MosaicGPT run it in the "
                                           "autocast dtype instead of fp32 (rounding)"),
    "tie_word_embeddings": _irrelevant("MosaicGPT always computes logits with wte (tied), whatever this says; "
                                       "so do we"),
    "use_cache": _RUNTIME, "verbose": _RUNTIME, "init_device": _RUNTIME,
    **{k: _INIT for k in ("param_init_fn", "init_div_is_residual", "init_std", "emb_init_std",
                          "emb_init_uniform_lim", "init_gain", "fan_mode", "init_nonlinearity")},
}

# MosaicGPTConfig's defaults (MosaicML examples, April 2023) for the keys the translation reads.
MOSAIC_GPT_DEFAULTS = {
    "mlp_ratio": 4, "max_seq_len": 2048, "vocab_size": 50368, "attn_pdrop": 0.0, "resid_pdrop": 0.0,
    "emb_pdrop": 0.0, "attn_qk_ln": False, "attn_clip_qkv": None, "softmax_scale": None, "prefix_lm": False,
    "attn_uses_sequence_id": False, "alibi": False, "alibi_bias_max": 8, "logit_scale": None, "no_bias": False,
    "embedding_fraction": 1.0,
}

MPT_ATTN_RULES: dict[str, Rule] = {
    "alibi": _refused("false means learned/rotary/no positions, not implemented", lambda v: not v, False),
    "alibi_bias_max": _honoured("ALiBi slopes, gen_slopes formula (transformers hard-codes 8)"),
    "qk_ln": _honoured("LayerNorm of q and k over d_model after Wqkv (transformers drops it)"),
    "clip_qkv": _honoured("clamp of Wqkv's output"),
    "softmax_scale": _honoured("attention score scale (default 1/sqrt(head_dim))"),
    "attn_pdrop": _DROPOUT_TRAIN,
    "attn_impl": _irrelevant("torch/flash/triton kernels of the same attention; we use torch SDPA"),
    "prefix_lm": _refused("bidirectional attention over a prefix given by a prefix_mask input; not implemented",
                          bool, True),
    "attn_uses_sequence_id": _irrelevant("only acts on a sequence_id input (packed training data); "
                                         "nothing here passes one"),
    "attn_type": _refused("multi-query / grouped-query attention (smaller Wqkv) is not implemented",
                          lambda v: v != "multihead_attention", "multiquery_attention"),
    "kv_n_heads": _refused("fewer key/value heads than query heads (GQA/MQA) is not implemented",
                           lambda v: v not in (None,), 1),  # checked against n_heads in _audit_mpt
    "rope": _refused("rotary position embeddings are not implemented", bool, True),
    "rope_theta": _irrelevant("used only with rope (refused)"),
    "rope_impl": _irrelevant("used only with rope (refused)"),
    "rope_dail_config": _irrelevant("used only with rope (refused)"),
    "rope_hf_config": _irrelevant("used only with rope (refused)"),
    "sliding_window_size": _refused("sliding-window attention is not implemented",
                                    lambda v: v not in (None, -1), 256),
    "attn_logit_softcapping": _refused("soft-capped attention scores are not implemented",
                                       lambda v: v is not None, 30.0),
    "qk_gn": _refused("per-head (group) norm of q and k is not implemented", bool, True),
    "fused_qkv": _refused("separate Wq/Wk/Wv weights are not implemented", lambda v: not v, False),
}

MPT_RULES: dict[str, Rule] = {
    "d_model": _honoured("width"),
    "n_heads": _honoured("attention heads"),
    "n_layers": _honoured("decoder blocks"),
    "max_seq_len": _honoured("longer sequences (prompt + cache) are an error"),
    "vocab_size": _honoured("embedding rows"),
    "expansion_ratio": _honoured("MLP width expansion_ratio * d_model (transformers' MPT is always 4x)"),
    "layer_norm_epsilon": _honoured("LayerNorm eps"),
    "attn_config": _honoured("see MPT_ATTN_RULES"),
    "logit_scale": _honoured("logits multiplied by it (transformers ignores it)",
                             lambda v: isinstance(v, str) and v != "inv_sqrt_d_model", "inv_d_model"),
    "no_bias": _honoured("false: biases in every Linear and LayerNorm (transformers ignores it)"),
    "norm_type": _refused("only LayerNorm is implemented (transformers ignores norm_type)",
                          lambda v: str(v).lower() not in ("layernorm", "low_precision_layernorm"), "rmsnorm"),
    "learned_pos_emb": _irrelevant("MPT-7B-era code adds learned positions only when alibi is false (refused); "
                                   "a checkpoint with transformer.wpe fails the strict load"),
    "tie_word_embeddings": _honoured("false: a separate lm_head is loaded (transformers honours it)"),
    "ffn_config": _refused("only the plain GELU MLP ('mptmlp') is implemented",
                           lambda v: not _plain_mpt_ffn(v), {"ffn_type": "mptglu"}),
    "fc_type": _refused("only torch/Transformer-Engine Linear layers (same math) are supported",
                        lambda v: (v.get("name") if isinstance(v, dict) else v) not in ("torch", "te"), "fp8"),
    "block_overrides": _refused("per-block config overrides are not implemented", bool, {"order": []}),
    "final_logit_softcapping": _refused("soft-capped logits are not implemented", lambda v: v is not None, 30.0),
    "use_pad_tok_in_ffn": _irrelevant("only matters for mixture-of-experts FFNs (refused via ffn_config)"),
    "alibi_slopes": _honoured("ours: the ALiBi slope formula, 'mpt' (default) or 'mosaic_gpt' (written into the "
                              "config of a converted MosaicGPT model)",
                              lambda v: v not in ("mpt", "mosaic_gpt"), "bloom"),
    "resid_pdrop": _DROPOUT_TRAIN,
    "emb_pdrop": _TRAIN_ONLY,
    "embedding_fraction": _TRAIN_ONLY,
    "initializer_range": _INIT, "init_config": _INIT, "init_device": _RUNTIME, "use_cache": _RUNTIME,
    "verbose": _RUNTIME,
}


def _plain_mpt_ffn(ffn: Any) -> bool:
    if ffn is None:
        return True
    if not isinstance(ffn, dict) or ffn.get("ffn_type", "mptmlp") != "mptmlp":
        return False
    act = ffn.get("ffn_act_fn")
    return act is None or (act.get("name") == "gelu" and act.get("approximate", "none") == "none")


def _apply_rules(cfg: dict, rules: dict[str, Rule], family: str, where: str) -> None:
    for key, value in cfg.items():
        rule = rules.get(key)
        if rule is not None and rule.refuse is not None and rule.refuse(value):
            raise UnsupportedLMConfig(f"{where}: {family} setting {key}={value!r} is not supported: {rule.note}")
    unknown = sorted(k for k in cfg if k not in rules and k not in GENERIC_KEYS)
    if unknown:
        logger.info("%s: %s config keys %s are not read by MosaicML's code either; ignored", where, family, unknown)


def audit_mosaic_gpt_config(cfg: dict, where: str = "config.json") -> dict:
    """Refuse what we cannot compute; returns the config with MosaicGPTConfig's defaults filled in."""
    full = {**MOSAIC_GPT_DEFAULTS, **cfg}
    _apply_rules(full, MOSAIC_GPT_RULES, "MosaicGPT", where)
    return full


def audit_mpt_config(cfg: dict, where: str = "config.json") -> None:
    _apply_rules(cfg, MPT_RULES, "MPT", where)
    attn = dict(cfg.get("attn_config") or {})
    if attn.get("kv_n_heads") in (cfg.get("n_heads"),):
        attn.pop("kv_n_heads")  # as many key/value heads as query heads: plain multi-head attention
    _apply_rules(attn, MPT_ATTN_RULES, "MPT attn_config", where)


# -- building ------------------------------------------------------------------------------------------
MOSAIC_GPT_RENAMES = [
    (r"\.ln_1\.", ".norm_1."),
    (r"\.ln_2\.", ".norm_2."),
    (r"\.mlp\.mlp_up\.", ".ffn.up_proj."),
    (r"\.mlp\.mlp_down\.", ".ffn.down_proj."),
    (r"^transformer\.ln_f\.", "transformer.norm_f."),
]  # attn.Wqkv, attn.out_proj, attn.q_ln, attn.k_ln and transformer.wte keep their names


def mosaic_gpt_to_mpt_config(cfg: dict, where: str = "config.json"):
    """The ``MptConfig`` (for :class:`MosaicMptForCausalLM`) of a MosaicGPT ``config.json`` dict."""
    from transformers import MptConfig

    c = audit_mosaic_gpt_config(cfg, where)
    attn_pdrop = c["attn_pdrop"] or 0
    config = MptConfig(
        d_model=c["d_model"], n_heads=c["n_heads"], n_layers=c["n_layers"], expansion_ratio=c["mlp_ratio"],
        max_seq_len=c["max_seq_len"], vocab_size=c["vocab_size"], no_bias=bool(c["no_bias"]),
        logit_scale=c["logit_scale"], resid_pdrop=c["resid_pdrop"], emb_pdrop=c["emb_pdrop"],
        embedding_fraction=c["embedding_fraction"], layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        attn_config={"alibi": True, "alibi_bias_max": c["alibi_bias_max"], "clip_qkv": c["attn_clip_qkv"],
                     "qk_ln": bool(c["attn_qk_ln"]), "softmax_scale": c["softmax_scale"],
                     "attn_pdrop": int(attn_pdrop) if attn_pdrop == int(attn_pdrop) else 0,
                     "attn_uses_sequence_id": bool(c["attn_uses_sequence_id"])},
        alibi_slopes="mosaic_gpt",  # read by MosaicMptModel; saved with the config
        **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg},
    )
    if attn_pdrop != int(attn_pdrop):  # transformers types MptAttentionConfig.attn_pdrop as int
        object.__setattr__(config.attn_config, "attn_pdrop", float(attn_pdrop))
    return config


def causal_lm_from_config(cfg: dict, *, where: str = "config.json"):
    """An LM with random weights from a ``config.json`` dict (``model_type`` included), built exactly as
    :func:`load_causal_lm` builds it; works under ``torch.device("meta")``."""
    from transformers import AutoConfig, AutoModelForCausalLM, MptConfig

    from .modeling.mpt import MosaicMptForCausalLM

    cfg = dict(cfg)
    model_type = cfg.get("model_type")
    if model_type == "mosaic_gpt":
        return MosaicMptForCausalLM(mosaic_gpt_to_mpt_config(cfg, where))
    if model_type == "mpt":
        audit_mpt_config(cfg, where)
        return MosaicMptForCausalLM(MptConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    cfg.pop("model_type", None)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def convert_mosaic_gpt_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("model.")
        for pattern, repl in MOSAIC_GPT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _config_dict(name_or_path: str, cache_dir=None, local_files_only=False) -> tuple[dict | None, str]:
    path = Path(name_or_path)
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            return None, str(file)
        try:
            return json.loads(file.read_text()), str(file)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e})") from e
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(name_or_path, "config.json", cache_dir=cache_dir, local_files_only=local_files_only)
        return json.loads(Path(file).read_text()), f"{name_or_path}/config.json"
    except Exception:
        return None, name_or_path  # let transformers produce its own error below


def _mosaic_weights(name_or_path: str, cache_dir=None, local_files_only=False) -> dict[str, torch.Tensor]:
    from .files import load_weights_file

    path = Path(name_or_path)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if path.is_dir():
            file = path / filename
            if not file.is_file():
                continue
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = Path(hf_hub_download(name_or_path, filename, cache_dir=cache_dir,
                                            local_files_only=local_files_only))
            except Exception:
                continue
        return load_weights_file(file)
    raise OSError(f"no model.safetensors or pytorch_model.bin found for MosaicGPT model '{name_or_path}'")


def _check_loaded(name: str, missing, unexpected, mismatched=()) -> None:
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the weights of '{name}' do not match its config: missing {list(missing)[:10]}, unexpected "
            f"{list(unexpected)[:10]}, wrong shape {list(mismatched)[:10]}"
        )


# What transformers' own MptForCausalLM computes whatever its config says: a 4 x d_model MLP, no biases,
# no q/k LayerNorm, ALiBi slopes for 8, unscaled logits (its save_pretrained keeps the config's values).
_TRANSFORMERS_MPT = {"expansion_ratio": 4, "no_bias": True, "logit_scale": None}
_TRANSFORMERS_MPT_ATTN = {"qk_ln": False, "alibi_bias_max": 8}


def _as_transformers_mpt(cfg: dict, where: str) -> dict:
    """Config overrides for an MPT directory that transformers' own ``MptForCausalLM`` saved
    (``architectures: ["MptForCausalLM"]``; MosaicML's exports name ``MPTForCausalLM``): its weights
    were made, and the original OpenFlamingo runs them, as that class computes, which ignores the
    settings above. MosaicML's meaning of them (what we honour elsewhere) would compute something else
    or expect weights the directory does not hold (biases, q/k norms, a narrower MLP)."""
    if cfg.get("architectures") != ["MptForCausalLM"]:
        return {}
    attn = dict(cfg.get("attn_config") or {})
    changed = [f"{k}={cfg[k]!r}" for k, v in _TRANSFORMERS_MPT.items() if k in cfg and cfg[k] != v]
    changed += [f"attn_config.{k}={attn[k]!r}" for k, v in _TRANSFORMERS_MPT_ATTN.items() if k in attn and attn[k] != v]
    if not changed:
        return {}
    logger.info("%s: saved by transformers' MptForCausalLM, which ignores %s: run as it computes", where,
                ", ".join(changed))
    return {**_TRANSFORMERS_MPT, "attn_config": {**attn, **_TRANSFORMERS_MPT_ATTN}}


def load_causal_lm(name_or_path: str, *, cache_dir=None, local_files_only=False, dtype=torch.float32, **kwargs):
    """A causal LM (eval mode) from a Hub id, a local directory or a ``builtin:`` name; see the module
    docstring for MosaicGPT/MPT. Weights that do not match the config exactly are an error."""
    from transformers import AutoModelForCausalLM

    from .modeling.mpt import MosaicMptForCausalLM
    from .files import quiet_small_load
    from .references import lm_ref

    name = str(name_or_path)
    if lm_ref(name).kind == "builtin":
        from .backbones import build_builtin_lm

        return build_builtin_lm(name, dtype=dtype)[0].eval()
    cfg, where = _config_dict(name, cache_dir, local_files_only)
    model_type = cfg.get("model_type") if cfg else None
    if model_type == "mosaic_gpt":
        with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
            model = causal_lm_from_config(cfg, where=where)
        sd = convert_mosaic_gpt_state_dict(_mosaic_weights(name, cache_dir, local_files_only))
        own = model.state_dict()
        mismatched = [f"{k} {tuple(v.shape)} (config: {tuple(own[k].shape)})" for k, v in sd.items()
                      if k in own and own[k].shape != v.shape]
        if mismatched:
            _check_loaded(name, [], [], mismatched)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        _check_loaded(name, [k for k in missing if k != "lm_head.weight"], unexpected)  # tied to wte below
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"MosaicGPT '{name}': the output head did not tie to transformer.wte")
        model.config.name_or_path = name  # what a saved Flamingo references (references.lm_ref_of)
        return model.to(dtype).eval()
    if model_type == "mpt":
        audit_mpt_config(cfg, where)
        kwargs = {**kwargs, **_as_transformers_mpt(cfg, where)}
        with _naming_the_model(name), quiet_small_load(name):
            model, info = MosaicMptForCausalLM.from_pretrained(
                name_or_path, cache_dir=cache_dir, local_files_only=local_files_only, dtype=dtype,
                output_loading_info=True, **kwargs,
            )
        _check_loaded(name, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                      info.get("mismatched_keys", ()))
        return model.eval()
    # transformers' Auto class looks for a PEFT adapter (adapter_config.json) without the load's
    # local_files_only and cache_dir: offline (the Hub unreachable) that lookup retried for ~25 s on
    # every load of a Hub LM, cached or not, and with a cache_dir it looked in the default cache.
    adapter_kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only, **kwargs.pop("adapter_kwargs", {})}
    with _naming_the_model(name), quiet_small_load(name):
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, cache_dir=cache_dir, local_files_only=local_files_only, dtype=dtype,
            adapter_kwargs=adapter_kwargs, **kwargs
        )


@contextlib.contextmanager
def _naming_the_model(name: str):
    """transformers' OSError for a model it cannot find (not cached offline: "We couldn't connect to
    'https://huggingface.co' ...") does not name the model; this one does."""
    try:
        yield
    except OSError as e:
        from .errors import missing_local_path, one_line

        local = missing_local_path(name)
        if local:  # (a local path with a typo, looked up on the Hub: "We couldn't connect to 'https://huggingface.co'")
            raise FileNotFoundError(f"could not load the language model '{name}': {local}; as a Hub repo id it "
                                    f"could not be fetched either ({one_line(e)})") from e
        if name in str(e):
            raise
        raise OSError(f"could not load the language model '{name}': {e}") from e
