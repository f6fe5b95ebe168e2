"""LoRA adapters (PEFT) on the frozen LM of a Flamingo model.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model keeps its
structure and parameter names (``...decoder_layer.self_attn.q_proj.lora_A.default.weight``); the
cross-attention blocks and the perceiver are never adapted, and they stay trainable.
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError, LoraConfig


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def lm_linear_layers(model: nn.Module) -> list[str]:
    """Full names (relative to ``model.lang_encoder``) of the linear layers inside the LM's
    decoder blocks, excluding the cross-attention."""
    prefix = model.decoder_layers_attr_name + "."
    types = _linear_types()
    return [
        name
        for name, module in model.lang_encoder.named_modules()
        if name.startswith(prefix) and ".decoder_layer." in name and isinstance(module, types)
    ]


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    candidates = lm_linear_layers(model)
    if cfg.target_modules == "auto":
        targets = candidates
    else:
        wanted = list(cfg.target_modules)
        targets = [n for n in candidates if any(n == w or n.endswith("." + w) for w in wanted)]
        unmatched = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in candidates)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ConfigError(
                f"lora.target_modules {unmatched} match no linear layer of the LM's decoder blocks; "
                f"available: {leaves}"
            )
    if not targets:
        raise ConfigError("lora: the LM's decoder blocks have no linear layers to adapt")
    return targets


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject LoRA adapters into the Flamingo's LM. Returns the adapted layer names."""
    try:
        import peft
    except ImportError as e:
        raise ConfigError("lora.enabled needs the `peft` package: pip install peft") from e
    targets = resolve_targets(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_config = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )
    peft.inject_adapter_in_model(lora_config, model.lang_encoder)
    # PEFT freezes everything but the adapters in the module it is given: restore what trained before.
    for name, p in model.named_parameters():
        if name in trainable or "lora_" in name:
            p.requires_grad_(True)
    return targets


def merge_lora(model: nn.Module) -> int:
    """Fold the adapters into the LM's weights and remove them (in place). Returns how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    from ..modeling.injection import set_attr_path

    merged = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in merged:
        module.merge()
        set_attr_path(model, name, module.get_base_layer())
    return len(merged)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())
