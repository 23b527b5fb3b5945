"""Parse a judge's free-text answer into a verdict: "A", "B", "tie", or None (a parse failure).

The rule, in order (case-insensitive):

1. **Bracketed tags** (MT-Bench): ``[[A]]``, ``[[B]]``, ``[[C]]`` or ``[[tie]]``. They are the
   format our templates ask for, so when any is present they decide and nothing else is read. All
   tags must agree (a judge restating ``[[A]] ... [[A]]`` is fine); tags that disagree
   (``[[A]] ... on reflection [[B]]``, or the format echoed back as ``[[A]], [[B]] or [[C]]``)
   are a parse failure: the answer is ambiguous, so it is counted, not guessed.
2. **Explicit verdict lines**: ``Preferred: A``, ``Final verdict: B``, ``Verdict: Response A``,
   ``Winner: tie``, ``Better response: (B)``, ``Answer: A`` and ``Output (a)`` (AlpacaEval). The
   last one wins, as judges reconsider (``Verdict: A ... Final verdict: B`` is B). A tie phrase
   after the label is a tie (``Verdict: A tie between them.``, ``Winner: draw``), never the
   article read as "A"; a lowercase article before a word (``Answer: a short list``) is no verdict.
3. A bare ``A`` / ``B`` / ``tie`` as the whole answer.

Anything else is a parse failure: counted, never scored as a loss.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.I)
# The tie alternatives come first, so that "A tie" is read as a tie and not as the verdict "A".
_EXPLICIT = re.compile(
    r"(?:(?:final\s+verdict|verdict|preferred|winner|better\s+response|answer)\s*[:=]\s*\(?\s*"
    r"(?:(?:response|output|summary|assistant)\s*)?\(?\s*"
    r"(?P<value>(?:it'?s\s+)?an?\s+(?:tie|draw)\b|tie\b|draw\b|A\b|B\b)"
    r"|^\s*output\s*\((?P<output>a|b)\)\s*$)",
    re.I | re.M,
)
_ARTICLE = re.compile(r"\s+[a-z]")  # "a" + a lowercase word is an article, not a verdict


def parse_verdict(text: str | None) -> str | None:
    if not text:
        return None
    tags = {_normalise(t) for t in _TAG.findall(text)}
    if tags:
        return tags.pop() if len(tags) == 1 else None
    verdicts = []
    for match in _EXPLICIT.finditer(text):
        value = match.group("value") or match.group("output")
        if value == "a" and match.group("value") and _ARTICLE.match(text, match.end()):
            continue
        verdicts.append(_normalise(value))
    if verdicts:
        return verdicts[-1]
    bare = text.strip().strip(".*\"' ").upper()
    if bare in {"A", "B", "TIE"}:
        return _normalise(bare)
    return None


def _normalise(token: str) -> str:
    token = token.upper()
    return "tie" if token in {"C", "TIE", "DRAW"} or token.endswith(("TIE", "DRAW")) else token


_SCORE_PATTERNS = [re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"), re.compile(r"(?:rating|score)\s*[:=]\s*(\d+(?:\.\d+)?)", re.I)]


def parse_score(text: str | None, low: float = 1.0, high: float = 10.0) -> float | None:
    """A 1-10 rating from ``[[7]]`` or ``Rating: 7`` (the last one wins); out of range = None."""
    if not text:
        return None
    for pattern in _SCORE_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if low <= value <= high else None
    return None
