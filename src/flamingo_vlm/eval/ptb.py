"""Caption tokenisation as ``COCOEvalCap`` does it, with Java or without.

``pycocoevalcap`` runs Stanford's ``PTBTokenizer -preserveLines -lowerCase`` (CoreNLP 3.4.1, the
jar it ships) over all captions joined by newlines and then drops punctuation tokens
(:data:`PTB_PUNCTUATIONS`). Two things can go wrong there, and both are handled here:

* **Line shifts.** The tokenizer reads one caption per line, and Java treats ``\\r``, ``\\v``,
  ``\\f``, U+2028 and U+2029 as line breaks too, so a reference holding one of them becomes two
  lines and every later caption is paired with the wrong image (pycocoevalcap does not notice:
  it ``zip``\\ s the lines with the ids). :func:`sanitize_caption` turns every character that
  Java or Python (``str.splitlines``) treat as a line break into a space, references and
  predictions are tokenised in separate calls, and the number of lines that come back must be
  exactly the number sent.
* **No Java.** :func:`ptb_tokenize_python` is a pure-Python tokenizer written to give Stanford's
  output on caption text: clitics (``do n't``, ``he 'll 've``, ``y' all``, ``'t is``),
  ``gon na``/``can not``/``gim me``, curly quotes and apostrophes, dashes (``--``), ellipses,
  ``-lrb-`` brackets, emoticons (``:-rrb-``), ``?!`` runs, acronyms and abbreviations (``u.s.``,
  ``mr.``, ``no. 5``), numbers with commas, periods, colons and slashes, ``AT&T``, URLs, e-mail
  addresses, hashtags, SGML tags, HTML entities, fractions (``½`` -> ``1/2``), ``€``/``£`` ->
  ``$``/``#``. Its rules were written from the jar's observed output (no Stanford code is
  copied); ``tests/data/ptb_stanford.json`` holds the jar's output for every test caption, and
  the parity test runs the jar itself where ``java`` exists. Known remaining differences are
  rare forms (``’n’`` with curly quotes, ``don`t`` with a backtick, some ``-in'`` words).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import unicodedata

__all__ = ["PTB_PUNCTUATIONS", "ptb_tokenize_java", "ptb_tokenize_python", "ptb_tokens", "sanitize_caption"]

#: Tokens ``pycocoevalcap``'s PTBTokenizer wrapper removes after tokenising (its list, verbatim:
#: upper-case ``-LRB-`` never matches the lower-cased output, so ``-lrb-`` stays, a quirk kept).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Every character that ends a line for Java's PTBTokenizer (\n, \r, \v, \f, U+2028, U+2029) or for
# Python's str.splitlines (also U+0085 NEL and the \x1c-\x1e separators); all become a space.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK_RE = re.compile(f"[{re.escape(LINE_BREAKS)}]")


def sanitize_caption(text: str) -> str:
    """``text`` on one line: each line-break character (:data:`LINE_BREAKS`) becomes a space."""
    return _LINE_BREAK_RE.sub(" ", text)


# -- the pure-Python tokenizer ------------------------------------------------------------------------
# Abbreviations the jar keeps with their period in any case / only capitalised / only before a number.
_ABBREV_ANY = (
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri mr mrs ms dr drs prof "
    "sen rep lt col gen gov adm rev maj sgt cpl pvt mt capt st ste ave pres hon mme mlle messrs inc co cos "
    "corp ltd plc dept univ assn intl sys bancorp jr sr bros esq vs etc al cf ph ft sq est tel ext rd blvd "
    "calif ind fla wis va vt ky ga md mo neb nev okla tenn wyo conn colo ariz dak kan kans mich minn mont penn m"
).split()
_ABBREV_CAPITALISED = "Miss Mass Wash Pa La Ill Tex Ore Del Ark".split()
_ABBREV_BEFORE_NUMBER = "No Nos no nos Fig Figs fig figs pp".split()
# Words the jar keeps whole although they hold an apostrophe.
_APOS_WORDS = "o'clock s'mores c'mon cap'n somethin' ol' li'l e'er ev'ry nat'l cont'd nor'easter 'em 'cause 'till 'til 'n' 'n".split()
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta"),
                "gimme": ("gim", "me"), "lemme": ("lem", "me")}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = {'"': "''", "\u201c": "``", "\u201d": "''", "\u00ab": "``", "\u00bb": "''", "\u2018": "`", "\u2019": "'",
           "\u2039": "`", "\u203a": "'", "`": "`", "'": "'"}
_DASHES = "\u2012\u2013\u2014\u2015"  # figure dash, en dash, em dash, horizontal bar: all "--"
_CURRENCY = {"\u20ac": "$", "\u00a3": "#"}  # PTB3 escaping: euro -> $, pound -> #
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'", "nbsp": None}

_W = r"[^\W_]"  # a letter or digit
_WORD = r"\w+(?:[-\u2010\u2011]\w+)*"  # letters/digits/_, joined by hyphens: t-shirt, 3-year-old
_RULES: list[tuple[str, str]] = [
    ("url", r"(?:https?|ftp)://[^\s<>\"]*[^\s<>\".,;:!?)\]]|www\.[^\s<>\"]*[^\s<>\".,;:!?)\]]"),
    ("email", r"[\w.+-]+@\w+(?:[.-]\w+)+|\w+@\w+"),
    ("tag", r"</?[A-Za-z][^<>\s]*>"),
    ("entity", r"&(?:amp|lt|gt|quot|apos|nbsp);|&#\d+;"),
    ("hashtag", r"[#@][A-Za-z]\w*"),
    ("apos_special", "|".join(re.escape(w) + ("(?![A-Za-z])" if w[-1].isalpha() else "")
                             for w in sorted(_APOS_WORDS, key=len, reverse=True)) + r"|'[2-9]0s(?![A-Za-z])"),
    ("apos_word", r"[A-HJ-XZ]'[A-Za-z]{2,}|[lLdDjJ]'[A-Za-z]+|[A-Za-z]*[aeiouAEIOU]'[aeiou][A-Za-z]*"),
    ("y_apos", r"[yY]'(?=[A-Za-z])"),
    ("t_apos", r"'[tT](?=(?:[iI][sS]|[wW][aA][sS])\b)"),
    ("negation", r"\w*?[nN]'[tT](?![A-Za-z])"),
    ("clitic", r"'(?:[sSdDmM]|[rR][eE]|[vV][eE]|[lL][lL])(?![A-Za-z])"),
    ("abbrev", r"(?:" + "|".join(_ABBREV_ANY) + r")\.(?![A-Za-z])"),
    ("abbrev_cap", r"(?-i:" + "|".join(_ABBREV_CAPITALISED) + r")\.(?![A-Za-z])"),
    ("abbrev_num", r"(?-i:" + "|".join(_ABBREV_BEFORE_NUMBER) + r")\.(?=\s*\d)"),
    ("acronym", r"(?:[A-Za-z]\.){2,}|[A-Za-z]\.(?![A-Za-z0-9])(?!\s*$)"),
    ("amp_word", r"[A-Z]+(?:&[A-Z]+)+"),
    ("currency_word", r"(?:US|[ACS]|NZ|HK)\$"),
    ("number", r"(?:(?<![-\w])-|\+)?(?:\d+(?:[,.:/]\d+)*|\.\d+)"),
    ("slash_word", rf"{_W}+(?:/{_W}+)+"),
    ("mixed_fraction", r"\d+ +\d+/\d+"),  # "2 1/2": one token, joined by a no-break space
    ("dotted_word", rf"{_W}+(?:[.!?]{_W}+)+"),
    ("word", _WORD),
    ("emoticon", r"[:;]-?[()]|[:;]-?[DPp](?![A-Za-z])"),
    ("stars", r"\*+"),
    ("ellipsis", r"\.{2,}|\u2026|\.(?: \.)+(?= |$)"),
    ("bangs", r"[?!]+"),
    ("dashes", rf"-{{2,}}|[{_DASHES}]+"),
]
_LEXER = [(name, re.compile(rx, re.IGNORECASE if name in ("abbrev", "apos_special") else 0)) for name, rx in _RULES]
_NEGATION_TAIL = re.compile(r"([nN]'[tT])$")


def _fraction(ch: str) -> str | None:
    dec = unicodedata.decomposition(ch)
    if dec.startswith("<fraction>"):
        return "".join(chr(int(c, 16)) for c in dec.split()[1:]).replace("\u2044", "/")
    return None


def _emit(name: str, text: str) -> list[str]:
    """The token(s) one lexer match stands for (not yet lower-cased)."""
    if name == "entity":
        key = text[1:-1].lower()
        if key in _ENTITIES:
            value = _ENTITIES[key]
            return [] if value is None else [_QUOTES.get(value, value)]
        return [text]
    if name == "negation":
        head = _NEGATION_TAIL.sub("", text)
        return [head, text[len(head):]] if head else [text]
    if name == "word" and text.lower() in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[text.lower()])
    if name == "emoticon":
        return [text[:-1] + _BRACKETS.get(text[-1], text[-1])]
    if name == "mixed_fraction":
        return [re.sub(" +", "\u00a0", text)]
    if name == "ellipsis":
        return ["..."]
    if name == "dashes":
        return ["--"]
    return [text]


def ptb_tokens(sentence: str) -> list[str]:
    """All tokens of one caption, lower-cased, punctuation included (what the jar prints)."""
    s = sanitize_caption(sentence)
    s = re.sub(r"(?<=\w)\u2019(?=\w)", "'", s)  # curly apostrophe inside a word: dog’s, don’t
    s = "".join(f"\t{_fraction(c)} " if _fraction(c) else c for c in s)  # 5½ -> 5 1/2 (two tokens)
    tokens: list[str] = []
    pos, n = 0, len(s)
    while pos < n:
        ch = s[pos]
        if ch.isspace() or ord(ch) > 0xFFFF or unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs"):
            pos += 1  # blanks; characters outside the BMP (emoji) and controls the jar drops
            continue
        best_name, best_end = None, pos
        for name, rx in _LEXER:
            m = rx.match(s, pos)
            if m and m.end() > best_end:
                best_name, best_end = name, m.end()
        if best_name is not None:
            tokens += _emit(best_name, s[pos:best_end])
            pos = best_end
            continue
        # one character: brackets, quotes, currency, fractions, symbols
        if ch in _BRACKETS:
            tokens.append(_BRACKETS[ch])
        elif ch in _QUOTES:
            tokens.append(_QUOTES[ch])
        elif ch in _CURRENCY:
            tokens.append(_CURRENCY[ch])
        elif ch in "\u2010\u2011":
            tokens.append("-")
        else:
            tokens.append(ch)
        pos += 1
    return [t.lower() for t in tokens]


def ptb_tokenize_python(sentence: str) -> str:
    """One caption as ``pycocoevalcap`` would give it with Java: tokenised like ``PTBTokenizer
    -preserveLines -lowerCase``, punctuation tokens dropped, joined with spaces."""
    return " ".join(t for t in ptb_tokens(sentence) if t not in PTB_PUNCTUATIONS)


# -- Stanford's tokenizer ------------------------------------------------------------------------------
def ptb_tokenize_java(sentences: list[str], jar: str) -> list[str]:
    """Tokenise ``sentences`` with the jar in one ``java`` call (one line each, punctuation
    dropped as ``pycocoevalcap`` does). Line breaks inside a sentence are made spaces first, and
    the tokenizer must return exactly one line per sentence (else RuntimeError)."""
    clean = [sanitize_caption(s) for s in sentences]
    keep = [i for i, s in enumerate(clean) if s.strip()]  # blank lines go the same way, but need no Java
    out = [""] * len(sentences)
    if not keep:
        return out
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="ptb_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(clean[i] for i in keep))
        proc = subprocess.run(
            ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path],
            capture_output=True,
        )
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise RuntimeError(f"Stanford PTBTokenizer ({jar}) failed with exit code {proc.returncode}: {err[0]}")
    text = proc.stdout.decode("utf-8")
    lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    if len(lines) != len(keep):
        raise RuntimeError(
            f"Stanford PTBTokenizer returned {len(lines)} lines for {len(keep)} captions; captions and "
            "their images would be misaligned (a line-break character the sanitiser does not know?)"
        )
    for i, line in zip(keep, lines):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w and w not in PTB_PUNCTUATIONS)
    return out
