"""How many tokens a model's context holds, and how few tokens a text can have.

:func:`max_context_of` reads the LM's context length. :func:`max_chars_per_token` gives a sound
bound on the characters one token can stand for, so a prompt far over the context is refused from
its length in characters alone, without tokenizing it
(:meth:`~.engine.Engine.surely_over_context`).
"""

from __future__ import annotations

import json
import unicodedata

from ..modeling.lm_info import lm_context_limit


def max_context_of(model, tokenizer, default: int = 2048) -> int:
    """The LM's context length: the position limit the trainer checks sequences against
    (:func:`flamingo_vlm.modeling.lm_info.lm_context_limit`), else the tokenizer's, else ``default``."""
    limit, _ = lm_context_limit(model.lang_encoder)
    if limit is not None:
        return limit
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return default


# Normalizers that never make the text shorter (a token still stands for at most its own length).
_NON_SHRINKING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase", "Precompiled_nfd"}
# Pre-tokenizers that keep every character (none drops text the way Whitespace / Split(removed) do).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def max_chars_per_token(tokenizer) -> tuple[int, str] | None:
    """A sound bound on the characters one token can stand for: ``(k, silent)`` such that a text
    has at least ``(len(text) - number of its characters in silent) / k`` tokens; None when this
    tokenizer gives no such bound.

    It holds for BPE tokenizers (fast, ``tokenizer.json``) that drop no input but ``silent``:
    every other input character is covered by the token(s) of its byte(s) or piece, and a token
    covers at most as many characters as its vocabulary string is long (byte-level: one
    vocabulary character per byte, and a character is at least one byte; Metaspace: ``▁`` stands
    for one space; a byte-fallback token ``<0x41>`` covers at most one); an added token covers its
    own content. NFC/NFKC normalization can compose up to 4 characters into one (the longest
    canonical decomposition in Unicode), so ``k`` is multiplied by that. A byte-level vocabulary
    without some byte symbols drops those bytes: the one-byte characters among them are
    ``silent`` (a multi-byte character keeps a token as long as every continuation byte has one).
    Anything else gives None: WordPiece/Unigram models (an ``[UNK]`` can swallow a whole word),
    fused unknowns, normalizers or pre-tokenizers that delete or shorten text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unusual backend: no bound
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None

    def parts(node) -> list[dict]:
        if not node:
            return []
        if node.get("type") != "Sequence":
            return [node]
        return [p for sub in node.get("normalizers") or node.get("pretokenizers") or [] for p in parts(sub)]

    factor = 1
    for norm in parts(spec.get("normalizer")):
        kind = norm.get("type")
        if kind in ("NFC", "NFKC"):
            factor = max(factor, max(len(unicodedata.normalize("NFD", chr(c))) for c in range(0x110000)))
        elif kind == "Replace":
            # Replacing one character by one or more never shortens the text.
            pattern = (norm.get("pattern") or {}).get("String")
            if pattern is None or len(pattern) != 1 or not norm.get("content"):
                return None
        elif kind not in _NON_SHRINKING_NORMALIZERS:
            return None
    pre_tokenizers = parts(spec.get("pre_tokenizer"))
    for pre in pre_tokenizers:
        if pre.get("type") not in _KEEPING_PRE_TOKENIZERS or pre.get("behavior") == "Removed":
            return None
    vocab = model.get("vocab") or {}
    silent = ""
    if any(pre.get("type") == "ByteLevel" for pre in pre_tokenizers):
        missing = sorted(b for symbol, b in _BYTE_OF_SYMBOL.items() if symbol not in vocab)
        if any(0x80 <= b < 0xC0 for b in missing):
            return None
        silent = "".join(chr(b) for b in missing if b < 0x80)
    elif not model.get("byte_fallback") and model.get("unk_token") is None:
        return None  # a character the vocabulary cannot spell would be dropped
    longest = max((len(t) for t in vocab), default=0)
    longest = max([longest, *(len(t.get("content", "")) for t in spec.get("added_tokens") or [])])
    return (longest * factor, silent) if longest > 0 else None


def _byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(rest)})
    return table


_BYTE_OF_SYMBOL = _byte_symbols()
