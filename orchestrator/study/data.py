"""What a study report shows, as plain rows: one dataclass per kind of result and
:class:`StudyData` holding them all, with a JSON round trip (:meth:`StudyData.save` /
:meth:`StudyData.load`) so a report can be rebuilt from a logged artifact."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

@dataclass
class VariantInfo:
    name: str
    ref_update: str  # none | soft | hard
    alpha: float | None = None
    tau: int | None = None


@dataclass
class WinRateRow:
    variant: str
    baseline: str
    win_rate: float  # across-seed mean
    ci_low: float
    ci_high: float
    n: int  # judged comparisons
    lc_win_rate: float | None = None  # length-controlled
    lc_ci_low: float | None = None
    lc_ci_high: float | None = None
    seeds: int | None = None


@dataclass
class CriterionRow:
    variant: str
    criterion: str  # one of CRITERIA
    win_rate: float
    ci_low: float | None = None
    ci_high: float | None = None
    baseline: str = "sft"


@dataclass
class FrontierPoint:
    """One checkpoint's quality vs its sampled KL from the starting model; seed None = across seeds."""

    variant: str
    step: int | None  # None: the final policy of a run whose last step is not known
    kl: float
    win_rate: float  # against the study's baseline (SFT)
    ci_low: float | None = None
    ci_high: float | None = None
    seed: int | None = None
    kl_se: float | None = None


@dataclass
class History:
    """A per-step series of one variant and seed (gradient norm, KL to the initial model)."""

    variant: str
    seed: int | None
    steps: list[int]
    values: list[float]


@dataclass
class DiversityRow:
    variant: str
    self_bleu: float | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    entropy: float | None = None


@dataclass
class SweepRow:
    ref_update: str
    alpha: float | None
    tau: int | None
    metric: float


@dataclass
class MatchedKLRow:
    variant: str
    reference: str
    kl: float
    win_rate: float
    ci_low: float
    ci_high: float
    reference_win_rate: float
    reference_ci_low: float
    reference_ci_high: float
    difference: float
    difference_ci_low: float | None = None
    difference_ci_high: float | None = None


_ROW_TYPES = {
    "variants": VariantInfo, "win_rates": WinRateRow, "criteria": CriterionRow, "frontier": FrontierPoint,
    "grad_norms": History, "kl_histories": History, "diversity": DiversityRow, "sweep": SweepRow, "matched_kl": MatchedKLRow,
}


@dataclass
class StudyData:
    title: str = "TR-DPO study"
    summary: dict[str, str] = field(default_factory=dict)  # shown as a key/value list under the title
    variants: list[VariantInfo] = field(default_factory=list)
    baseline: str = "sft"  # what the frontier's win rates are measured against
    reference_variant: str = "dpo"  # what matched-KL comparisons are against
    win_rates: list[WinRateRow] = field(default_factory=list)
    criteria: list[CriterionRow] = field(default_factory=list)
    frontier: list[FrontierPoint] = field(default_factory=list)
    grad_norms: list[History] = field(default_factory=list)
    kl_histories: list[History] = field(default_factory=list)
    diversity: list[DiversityRow] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    sweep_metric: str = "metric"
    sweep_mode: str = "max"  # max | min: which end of the sweep metric is better
    matched_kl: list[MatchedKLRow] | None = None  # None: computed from the frontier
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StudyData":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown StudyData fields: {sorted(unknown)}")
        kwargs = dict(data)
        for name, row_type in _ROW_TYPES.items():
            if kwargs.get(name) is not None:
                kwargs[name] = [row_type(**row) for row in kwargs[name]]
        return cls(**kwargs)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> "StudyData":
        return cls.from_dict(json.loads(Path(path).read_text()))
