"""The verdict parser's one rule (evaluation/verdicts.py), case by case: bracketed tags decide and
must agree; else explicit verdict lines, the last one winning; a tie phrase is a tie."""

from __future__ import annotations

import pytest

from evaluation.verdicts import parse_verdict

CASES = [
    # 1. Bracketed tags (MT-Bench) decide when present.
    ("After weighing both... [[A]]", "A"),
    ("[[B]]", "B"),
    ("It is close. [[C]]", "tie"),
    ("[[ tie ]]", "tie"),
    ("Response A is better. [[A]]\nSo again: [[a]]", "A"),  # a restatement agrees
    ("[[C]] ... both equally good, [[tie]]", "tie"),  # two spellings of one verdict
    ("[[A]] because it is clearer.\nFinal verdict: B", "A"),  # tags outrank a verdict line
    ("First I thought [[A]] but on reflection [[B]]", None),  # disagreeing tags: ambiguous
    ("The format is [[A]], [[B]] or [[C]]. I pick [[A]].", None),  # the format echoed back
    # 2. Explicit verdict lines; the last one wins.
    ("Comparison: ...\nPreferred: B", "B"),
    ("Final verdict: tie", "tie"),
    ("Verdict: A\n...on reflection...\nFinal verdict: B", "B"),
    ("Verdict: A tie between them.", "tie"),  # a tie phrase, not the article read as "A"
    ("Verdict: it's a tie", "tie"),
    ("Winner: draw", "tie"),
    ("Verdict: Response A", "A"),
    ("Better response: (B)", "B"),
    ("Winner = Assistant B, clearly.", "B"),
    ("Verdict: A because it cites its source.", "A"),
    ("Verdict: A's answer is better", "A"),
    ("Answer: a short list of steps.", None),  # the article before a word is no verdict
    ("Output (a)", "A"),
    ("Output (b)\nPreferred: A", "A"),
    # 3. A bare verdict as the whole answer.
    ("B", "B"),
    ("**A**.", "A"),
    ("Tie", "tie"),
    # Everything else is a parse failure.
    ("I cannot decide between them.", None),
    ("", None),
    (None, None),
    ("The answer is Banana", None),
    ("Verdict: Both are fine.", None),
    ("Verdict: C", None),  # C means tie only inside [[ ]]
]


@pytest.mark.parametrize("text, verdict", CASES, ids=[repr(t)[:40] for t, _ in CASES])
def test_verdict_rule(text, verdict):
    assert parse_verdict(text) == verdict
