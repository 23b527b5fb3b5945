"""Parse a judge's free-text answer into a verdict: "A", "B", "tie", or None (a parse failure).

Accepted forms (case-insensitive, the last explicit one wins, as judges often restate):
``[[A]]`` / ``[[B]]`` / ``[[C]]`` or ``[[tie]]`` (MT-Bench style), ``Preferred: A``,
``Final verdict: B``, ``Winner: tie``, ``Output (a)`` (AlpacaEval style) and a bare ``A``/``B``.
Anything else is a parse failure: counted, never scored as a loss.
"""

from __future__ import annotations

import re

_PATTERNS = [
    re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.I),
    re.compile(r"(?:preferred|final verdict|verdict|winner|better response|answer)\s*[:=]\s*\(?\s*(?:response|output|summary|assistant)?\s*\(?(A|B|TIE)\b\)?", re.I),
    re.compile(r"^\s*output\s*\((a|b)\)\s*$", re.I | re.M),
]


def parse_verdict(text: str | None) -> str | None:
    if not text:
        return None
    for pattern in _PATTERNS:
        found = pattern.findall(text)
        if found:
            return _normalise(found[-1])
    bare = text.strip().strip(".*\"' ").upper()
    if bare in {"A", "B", "TIE"}:
        return _normalise(bare)
    return None


def _normalise(token: str) -> str:
    token = token.upper()
    return "tie" if token in {"C", "TIE"} else token


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
