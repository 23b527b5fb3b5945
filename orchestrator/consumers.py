"""What a consumer of a run's outputs needs from its configuration, checked before anything runs.

A training without validation data reports no ``val/*`` metric at all (absent, never a 0.0 that
would rank first under ASHA). Whoever needs them says so up front, naming the fields:

    sweep (ASHA or the ranking)   scheduler.metric is a val/ metric     -> validation data
    trdpo run with evaluation     prompts from the held-out split       -> validation data, or
                                  (evaluation.prompts_path unset)          evaluation.prompts_path
"""

from __future__ import annotations

from trainers.config import DataConfig


def missing_validation(data: DataConfig) -> str | None:
    """Why a training on ``data`` has no validation pairs (naming the fields), or None when the
    configuration gives it some."""
    if data.validation_path or data.validation_split or data.validation_fraction > 0:
        return None
    return "data.validation_fraction is 0 and no data.validation_path/validation_split is set"
