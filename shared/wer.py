"""Word error rate of what a listener heard against what the speaker said.

Both sides are normalised first, so only real recognition errors count: case, punctuation and
spacing are dropped, English contractions expanded ("that's" = "that is"), numbers compared as
spoken ("42" = "forty two", "3.5" = "three point five"), "%" is "percent", "&" is "and".
jiwer computes the edit distance (a well-kept library for exactly this); num2words spells the
numbers.

    wer("My order 42 arrived late.", "my order forty-two arrived late")  # 0.0

A turn the listener never reported, or heard as nothing, is fully misheard: its hypothesis is
``None`` or empty and every reference word counts as an error (WER 1.0), never left out. Leaving
it out would make a listener that hears nothing score better than one that mishears.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import jiwer
from num2words import num2words

_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_CONTRACTIONS = jiwer.ExpandCommonEnglishContractions()  # "that's" = "that is", "won't" = "will not"
_SYMBOLS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at ", "$": " dollars "}


def _spell(match: re.Match[str], language: str) -> str:
    raw = match.group(0)
    digits = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", raw) else raw.replace(",", ".")
    try:
        value: float | int = float(digits) if "." in digits else int(digits)
        return " " + str(num2words(value, lang=language)) + " "
    except (ValueError, NotImplementedError, OverflowError):
        # num2words has no words for this language (NotImplementedError) or this number: the digits
        # stay as written, on both sides of the comparison alike
        return " " + raw + " "


def normalize(text: str, language: str = "en") -> str:
    """Lower case, numbers as words, no punctuation, single spaces. Devanagari and other scripts'
    letters and marks are kept (only punctuation and symbols go)."""
    text = unicodedata.normalize("NFC", text)
    lang = language.split("-", 1)[0].lower() or "en"
    text = _NUMBER.sub(lambda m: _spell(m, lang), text)
    for sym, word in _SYMBOLS.items():
        text = text.replace(sym, word)
    text = text.lower().replace("-", " ").replace("\u2019", "'")
    if lang == "en":
        text = _CONTRACTIONS(text)
    text = re.sub(r"(?<=\w)'(?=\w)", "", text)  # other apostrophes inside words: "o'clock" -> "oclock"
    # drop every punctuation/symbol character; keep letters, marks (Devanagari vowel signs), digits
    kept = "".join(ch if unicodedata.category(ch)[0] in "LMN" or ch.isspace() else " " for ch in text)
    return " ".join(kept.split())


def wer(reference: str, hypothesis: str | None, language: str = "en") -> float:
    """Word error rate of ``hypothesis`` against ``reference`` after :func:`normalize` (0.0 = exact).
    An empty reference scores 0.0 for an empty hypothesis and 1.0 otherwise; ``None`` (never heard)
    is an empty hypothesis: 1.0 for any reference with words."""
    ref, hyp = normalize(reference, language), normalize(hypothesis or "", language)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))


def corpus_wer(pairs: Sequence[tuple[str, str | None]], language: str = "en") -> float:
    """WER over many utterances: total word errors / total reference words (not a mean of ratios).
    A ``None`` or empty hypothesis (unheard) counts each of its reference words as an error."""
    refs = [normalize(r, language) for r, _ in pairs]
    hyps = [normalize(h or "", language) for _, h in pairs]
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not kept:
        return 0.0
    out = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
    return float(out.wer)
