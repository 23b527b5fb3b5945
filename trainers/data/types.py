"""The data's types, shared by loading (trainers.data.loading), the tokenized cache
(trainers.data.token_cache) and batching. They sit apart so that loading can use the cache and the
cache can rebuild pairs and reports without either importing the other: no import cycle."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from trainers.errors import UserFacingError

Messages = list[dict[str, str]]
Text = str | Messages


class BadRow(ValueError):
    """A row that cannot become a preference pair; ``reason`` says why (without the location)."""


class DataError(UserFacingError, ValueError):
    """Data that cannot be used; the message names source and row."""


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    row: int  # 1-based position in its source, for messages


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()) or "none"
        return (
            f"{self.source}: {self.rows_read} rows read, {self.kept} kept; skipped: {skipped}; "
            f"truncated prompts: {self.prompts_truncated}, truncated responses: {self.responses_truncated}"
        )
