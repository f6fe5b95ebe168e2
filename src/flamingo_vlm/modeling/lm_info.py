"""What the model, the trainer and the server need to know about a causal LM, read from its config
in one place: its text config, hidden size and context length (a config names these differently per
family: ``d_model``/``hidden_size``/``n_embd``; ``n_positions``/``max_position_embeddings``/
``max_seq_len``/``n_ctx``)."""

from __future__ import annotations

from torch import nn


def lm_text_config(lm: nn.Module):
    """The LM's (text) config: multimodal configs keep it under ``get_text_config()``."""
    return lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config


def lm_hidden_size(lm: nn.Module) -> int:
    config = lm_text_config(lm)
    for name in ("d_model", "hidden_size", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(lm).__name__} from its config")


def lm_context_limit(lm: nn.Module) -> tuple[int | None, bool]:
    """(max positions from the LM config, or None; whether the LM has learned absolute position
    embeddings, which make positions past the limit an error rather than a degradation)."""
    config = lm_text_config(lm)
    limit = None
    for name in ("n_positions", "max_position_embeddings", "max_seq_len", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    token_emb = lm.get_input_embeddings()
    absolute = any(
        isinstance(m, nn.Embedding) and m is not token_emb and ("pos" in n.lower() or n.endswith("wpe"))
        for n, m in lm.named_modules()
    )
    return limit, absolute
