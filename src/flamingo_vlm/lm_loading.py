"""Loading causal LMs, including the MosaicGPT checkpoints behind OpenFlamingo-3B.

``anas-awadalla/mpt-1b-redpajama-200b(-dolly)`` are "mosaic_gpt" remote-code models that current
transformers cannot load. Their weights are an MPT with other module names, so they are mapped
onto transformers' own ``MptForCausalLM`` (no remote code is run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MOSAIC_GPT_RENAMES = [
    (r"\.ln_1\.", ".norm_1."),
    (r"\.ln_2\.", ".norm_2."),
    (r"\.mlp\.mlp_up\.", ".ffn.up_proj."),
    (r"\.mlp\.mlp_down\.", ".ffn.down_proj."),
    (r"^transformer\.ln_f\.", "transformer.norm_f."),
]


def _config_dict(name_or_path: str, cache_dir=None, local_files_only=False) -> dict | None:
    path = Path(name_or_path)
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "config.json", cache_dir=cache_dir,
                                               local_files_only=local_files_only)).read_text())
    except Exception:
        return None  # let transformers produce its own error below


def mosaic_gpt_to_mpt_config(cfg: dict):
    from transformers import MptConfig

    if not cfg.get("alibi", True):
        raise ValueError("only ALiBi MosaicGPT models map onto transformers' MPT (this one uses learned positions)")
    if cfg.get("mlp_ratio", 4) != 4:
        raise ValueError(f"transformers' MPT has a 4x MLP; this MosaicGPT has mlp_ratio={cfg.get('mlp_ratio')}")
    return MptConfig(
        d_model=cfg["d_model"], n_heads=cfg["n_heads"], n_layers=cfg["n_layers"], expansion_ratio=4,
        max_seq_len=cfg["max_seq_len"], vocab_size=cfg["vocab_size"], no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": cfg.get("alibi_bias_max", 8),
                     "clip_qkv": cfg.get("attn_clip_qkv"), "qk_ln": bool(cfg.get("attn_qk_ln", False)),
                     "softmax_scale": cfg.get("softmax_scale")},
        logit_scale=cfg.get("logit_scale"),
    )


def convert_mosaic_gpt_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("model.")
        for pattern, repl in MOSAIC_GPT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _mosaic_weights(name_or_path: str, cache_dir=None, local_files_only=False) -> dict[str, torch.Tensor]:
    path = Path(name_or_path)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if path.is_dir():
            file = path / filename
            if not file.is_file():
                continue
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = Path(hf_hub_download(name_or_path, filename, cache_dir=cache_dir, local_files_only=local_files_only))
            except Exception:
                continue
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    raise OSError(f"no model.safetensors or pytorch_model.bin found for MosaicGPT model '{name_or_path}'")


def load_causal_lm(name_or_path: str, *, cache_dir=None, local_files_only=False, dtype=torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM, MptForCausalLM

    from .backbones import build_builtin_lm, is_builtin

    if is_builtin(str(name_or_path)):
        return build_builtin_lm(str(name_or_path), dtype=dtype)[0].eval()
    cfg = _config_dict(str(name_or_path), cache_dir, local_files_only)
    if cfg and cfg.get("model_type") == "mosaic_gpt":
        model = MptForCausalLM(mosaic_gpt_to_mpt_config(cfg))
        sd = convert_mosaic_gpt_state_dict(_mosaic_weights(str(name_or_path), cache_dir, local_files_only))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte
        if missing or unexpected:
            raise ValueError(f"MosaicGPT weights of '{name_or_path}' did not map onto MPT: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        model.tie_weights()
        model.config._name_or_path = str(name_or_path)
        return model.to(dtype).eval()
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, cache_dir=cache_dir, local_files_only=local_files_only, dtype=dtype, **kwargs
    )
