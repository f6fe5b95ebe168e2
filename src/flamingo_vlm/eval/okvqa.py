"""OK-VQA answer stemming as OpenFlamingo did it (``open_flamingo/eval/ok_vqa_utils.py``).

OpenFlamingo stems each predicted OK-VQA answer before VQA accuracy (the annotations of OK-VQA
v1.1 were stemmed the same way): ``nltk.word_tokenize``, ``nltk.pos_tag``, then per token

1. its manual table (``data/okvqa_manual_matches.tsv``, 168 entries copied from its code),
2. else, a token ending in ``-ing`` -> WordNet's verb lemma (``WordNetLemmatizer.lemmatize(w,
   VERB)``: morphy, shortest of the lemmas found, the token itself when none),
3. else, a token tagged ``NNS``/``NNPS`` -> ``inflection.singularize``;

and the tokens joined with single spaces. Here, offline and without nltk's data downloads:

* tokenisation: nltk's own ``NLTKWordTokenizer`` (the word tokenizer ``word_tokenize`` runs; it
  needs no data), over the whole answer. ``word_tokenize`` first splits sentences with Punkt
  (a data download); that only matters for an answer holding a sentence break (``"yes. no"``).
* WordNet: morphy re-implemented over WordNet 3.0's verb lemmas and -ing exceptions, shipped in
  ``data/wordnet_verbs.txt`` (taken from Debian's ``wordnet-base``); equal to nltk's
  ``WordNetLemmatizer`` on every -ing word tested (``tests/test_eval_okvqa.py`` compares them
  where nltk and WordNet are installed).
* the POS tagger (averaged perceptron, a data download) is replaced by a rule for "tagged as a
  plural noun": an alphabetic token ending in ``s`` (not ``ss``/``us``/``is``), or an irregular
  plural (``people``, ``men``, ``children``, ...), that is not one of the function words and
  singular ``-s`` nouns the tagger knows (``is``, ``this``, ``its``, ``bus``, ``news``, ...:
  :data:`NOT_PLURAL`). Where the tagger would decide otherwise (a verb such as ``runs`` in a
  longer answer, a rare singular noun ending in ``s``), the result differs; see the README.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["IRREGULAR_PLURALS", "MANUAL_MATCHES", "NOT_PLURAL", "okvqa_stem", "okvqa_tokenize", "wordnet_verb_lemma"]

#: Plural forms without a final ``s`` that the tagger marks ``NNS`` (``inflection`` singularises them).
IRREGULAR_PLURALS = frozenset("people men women children mice lice oxen geese feet teeth".split())
#: Tokens ending in ``s`` that are not plural nouns: function words, adverbs, and frequent singular
#: nouns (the tagger's lexicon knows them as NN). Tokens of OpenFlamingo's manual table never get here.
NOT_PLURAL = frozenset(
    "is was has does his hers its ours yours theirs this thus us as yes whereas perhaps always sometimes "
    "towards afterwards besides nevertheless less unless across plus minus its bus gas news series species "
    "means status bonus campus census chaos circus virus focus cactus octopus christmas whats thats lets "
    "hes shes".split()
)


def _data(name: str) -> str:
    return resources.files("flamingo_vlm.eval").joinpath("data", name).read_text(encoding="utf-8")


def _load_manual_matches() -> dict[str, str]:
    out = {}
    for n, line in enumerate(_data("okvqa_manual_matches.tsv").splitlines(), 1):
        if line and not line.startswith("#"):
            key, sep, value = line.partition("\t")
            if not sep:
                raise ValueError(f"eval/data/okvqa_manual_matches.tsv:{n}: expected '<token>\\t<stem>', got {line!r}")
            out[key] = value
    return out


#: OpenFlamingo's manual matches (token -> stem), applied first.
MANUAL_MATCHES: dict[str, str] = _load_manual_matches()


@functools.lru_cache(maxsize=1)
def _wordnet_verbs() -> tuple[frozenset[str], dict[str, list[str]]]:
    lemmas, exceptions = set(), {}
    for line in _data("wordnet_verbs.txt").splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("! "):
            form, *bases = line[2:].split()
            exceptions[form] = bases
        else:
            lemmas.add(line)
    return frozenset(lemmas), exceptions


# WordNet's detachment rules for verbs, in morphy's order (nltk's MORPHOLOGICAL_SUBSTITUTIONS[VERB]).
_VERB_RULES = (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", ""))


def wordnet_verb_lemma(word: str) -> str:
    """WordNet's verb lemma of ``word`` as ``nltk``'s ``WordNetLemmatizer().lemmatize(word, "v")``
    gives it: morphy's candidates (the exception list, else the word and one round of detachment
    rules, else further rounds) kept when they are verb lemmas, the shortest returned (first on
    ties); ``word`` itself when there is none. Case-sensitive, as there."""
    lemmas, exceptions = _wordnet_verbs()

    def known(forms):
        seen: list[str] = []
        for f in forms:
            if f in lemmas and f not in seen:
                seen.append(f)
        return seen

    def rules(forms):
        return [f[: -len(old)] + new for f in forms for old, new in _VERB_RULES if f.endswith(old)]

    if word in exceptions:
        found = known([word] + exceptions[word])
    else:
        forms = rules([word])
        found = known([word] + forms)
        while not found and forms:
            forms = rules(forms)
            found = known(forms)
    return min(found, key=len) if found else word


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        from nltk.tokenize.destructive import NLTKWordTokenizer
    except ImportError:
        raise ImportError("OK-VQA stemming needs nltk (its word tokenizer, no data download): pip install nltk") from None
    return NLTKWordTokenizer()


def okvqa_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize``'s tokens for a short answer (without its Punkt sentence split)."""
    return _tokenizer().tokenize(text)


#: Plurals ending in -us or -is (the other such words are singular: bus, cactus, tennis, iris).
US_IS_PLURALS = frozenset("menus emus gnus tutus haikus skis kiwis taxis bikinis martinis safaris yetis alibis".split())


def _tagged_plural(token: str) -> bool:
    """Whether the tagger would mark ``token`` NNS/NNPS, by rule (see the module docstring)."""
    low = token.lower()
    if low in IRREGULAR_PLURALS or low in US_IS_PLURALS:
        return True
    return (len(low) > 2 and low.isalpha() and low.endswith("s") and low not in NOT_PLURAL
            and not low.endswith(("ss", "us", "is")))  # glass, bus, delicious, tennis: not plural nouns


def okvqa_stem(text: str) -> str:
    """Stem an answer as OpenFlamingo's ``OKVQAStemmer.stem`` does (see the module docstring for
    what is reproduced exactly and what by rule): ``"leaves"`` -> ``"leaf"``, ``"playing
    frisbee"`` -> ``"play frisbee"``, ``"people"`` -> ``"person"``, ``"1,000"`` stays."""
    import inflection

    out = []
    for w in okvqa_tokenize(text):
        if w in MANUAL_MATCHES:
            w = MANUAL_MATCHES[w]
        elif w.endswith("ing"):
            w = wordnet_verb_lemma(w)
        elif _tagged_plural(w):
            w = inflection.singularize(w)
        out.append(w)
    return " ".join(out)
