"""The interleaved prompt format's special tokens, and the text helpers that need no tokenizer.

Standard library only: the command line builds its whole parser (``--help`` and usage errors
included) from modules that import this, and must not load torch to do it (seconds on a small
CPU). :mod:`flamingo_vlm.processing` re-exports every name here.
"""

from __future__ import annotations

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """``text`` up to the first of the ``stops`` strings in it, and whether one was there (a stop
    string ends the answer and is not part of it, as in OpenAI's API)."""
    cut = min((i for i in (text.find(s) for s in stops or ()) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_holdback(text: str, stops) -> int:
    """How many trailing characters of ``text`` could still grow into one of the ``stops`` strings
    (a stream holds them back until the next token says)."""
    keep = 0
    for s in stops or ():
        for j in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:j]):
                keep = j
                break
    return keep
