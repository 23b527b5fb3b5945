"""Schema of a sweep file (``tune_configs/*.yaml``) and its expansion into trial overrides.

    base: ../examples/hh_pythia.yaml        # experiment file, relative to this file ("default": the demo)
    overrides: [training.max_steps=2000]   # applied to base for every trial
    search:
      algorithm: grid                       # grid | random
      num_samples: 1                        # random: trials per variant; grid: repeats
      space:                                # flat: every trial samples these
        training.learning_rate: {loguniform: [1.0e-7, 1.0e-5]}
      variants:                             # conditional: each entry is its own sub-grid
        - {training.ref_update: none, training.alpha: null, training.tau: null}
        - {training.ref_update: soft, training.alpha: {grid: [0.3, 0.6]}, training.tau: {grid: [1, 64]}}
    scheduler: {type: asha, metric: val/rewards/accuracy, mode: max, grace_period: 50, reduction_factor: 2, max_t: 400}

Every trial's config is validated before anything starts; the ASHA metric must be comparable
across trials and reported while they train: a validation metric, measured against the fixed
initial model (judge metrics come after training: judge the survivors with ``trdpo eval``).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.consumers import missing_validation
from trainers.config import VALIDATION_METRICS, Section
from orchestrator.config import (ConfigError, ExperimentConfig, TrackingConfig, apply_override, default_config_path, read_yaml,
                                 resolve_inputs, set_values, validate_tree)

COMPARABLE_PREFIXES = ("val/", "eval/")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class SearchConfig(Section):
    algorithm: Literal["grid", "random"] = Field("grid", description="grid: every combination; random: num_samples draws per variant.")
    num_samples: int = Field(1, gt=0, description="Random draws per variant (grid: repeats of the whole grid).")
    space: dict[str, Any] = Field(default_factory=dict, description="Dotted field -> value or {grid|choice|uniform|loguniform|randint: ...}.")
    variants: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}], description="Conditional sub-spaces, each a dict like 'space'; trials = union over variants."
    )

    @field_validator("space")
    @classmethod
    def _distributions(cls, space: dict) -> dict:
        for key, value in space.items():
            check_value(key, value)
        return space

    @model_validator(mode="after")
    def _grid_has_no_randoms(self) -> "SearchConfig":
        entries = [self.space, *self.variants]
        randoms = sorted({k for entry in entries for k, v in entry.items() if isinstance(v, dict) and next(iter(v)) != "grid"})
        if self.algorithm == "grid" and randoms:
            raise ValueError(f"algorithm 'grid' takes only values and {{grid: [...]}}; {randoms} are random: use algorithm 'random'")
        return self

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: list) -> list:
        if not variants:
            raise ValueError("needs at least one variant (use [{}] for none)")
        for variant in variants:
            for key, value in variant.items():
                check_value(key, value)
        return variants


def check_value(key: str, value: Any) -> None:
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise ValueError(f"{key}: a search entry is a value or one of {{{'|'.join(DISTRIBUTIONS)}: ...}}, got {value}")
        kind, arg = next(iter(value.items()))
        if kind in ("grid", "choice") and (not isinstance(arg, list) or not arg):
            raise ValueError(f"{key}: '{kind}' takes a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and (not isinstance(arg, list) or len(arg) != 2 or not arg[0] < arg[1]):
            raise ValueError(f"{key}: '{kind}' takes [low, high] with low < high")
        if kind == "loguniform" and arg[0] <= 0:
            raise ValueError(f"{key}: 'loguniform' needs low > 0")


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = Field("asha", description="asha: stop poor trials early; none: run every trial to the end.")
    metric: str = Field("val/rewards/accuracy", description="Validation metric that ranks trials (against the fixed initial model).")
    mode: Literal["max", "min"] = Field("max", description="Whether larger metric values are better.")
    grace_period: int = Field(10, gt=0, description="ASHA: optimizer steps before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    max_t: int = Field(100, gt=0, description="ASHA: steps of the longest trial (set to the trials' max_steps).")

    @field_validator("metric")
    @classmethod
    def _comparable(cls, metric: str) -> str:
        if metric.startswith("eval/"):
            raise ValueError(
                f"{metric!r} is a judge metric, computed after training and never reported while a trial trains, so "
                "ASHA could stop nothing; rank trials on a val/ metric and judge the survivors with `trdpo eval`")
        known = sorted(set(VALIDATION_METRICS["trdpo"]) | set(VALIDATION_METRICS["sft"]))
        if not metric.startswith("val/"):
            raise ValueError(
                f"{metric!r} is not comparable across trials: training metrics are measured against each trial's "
                f"moving reference. Use a validation metric, measured against the fixed initial model: {', '.join(known)}")
        if metric not in known:
            raise ValueError(f"{metric!r} is not reported by the training loop; choose from {', '.join(known)}")
        return metric


class SweepConfig(Section):
    name: str = Field("sweep", description="Sweep name (MLflow parent run, Tune experiment directory).")
    base: str = Field("default", description="Experiment file the trials start from, relative to the sweep file; 'default' = the demo.")
    overrides: list[str] = Field(default_factory=list, description="Dotted key=value overrides applied to base for all trials.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="The search space and algorithm.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Early stopping.")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Default: cluster CPUs // CPUs per trial.")
    tracking: TrackingConfig | None = Field(None, description="Overrides the base experiment's tracking section.")

    @model_validator(mode="after")
    def _scheduler_fits(self) -> "SweepConfig":
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.scheduler.max_t:
            raise ValueError(f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds scheduler.max_t ({self.scheduler.max_t})")
        return self


def _grid_axes(entries: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Split entries into fixed values, grid axes and random distributions."""
    fixed, grids, randoms = {}, {}, {}
    for key, value in entries.items():
        if isinstance(value, dict) and next(iter(value)) == "grid":
            grids[key] = value["grid"]
        elif isinstance(value, dict):
            randoms[key] = value
        else:
            fixed[key] = value
    return fixed, grids, randoms


def expand_variants(search: SearchConfig) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Concrete grid points: ``[(fixed_and_grid_values, random_distributions)]``, one per point."""
    points = []
    for variant in search.variants:
        fixed, grids, randoms = _grid_axes({**search.space, **variant})
        for combo in itertools.product(*grids.values()) if grids else [()]:
            points.append(({**fixed, **dict(zip(grids, combo))}, randoms))
    return points


def _distribution_extremes(dist: dict) -> list[Any]:
    kind, arg = next(iter(dist.items()))
    return list(arg) if kind == "choice" else [arg[0], arg[1] - 1 if kind == "randint" else arg[1]]


def _apply(tree: dict, values: dict[str, Any]) -> dict:
    tree = copy.deepcopy(tree)
    set_values(tree, values)
    return tree


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()) or "base"


class LoadedSweep(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: str
    sweep: SweepConfig
    base_tree: dict
    points: list[tuple[dict, dict]]


def load_sweep(path: str | Path) -> LoadedSweep:
    """Read and validate a sweep file *and every trial it implies*; errors name the trial."""
    path = Path(path)
    tree = read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(str(path), [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg'].removeprefix('Value error, ')}"
                                      for e in exc.errors()]) from None
    base_path = default_config_path() if sweep.base == "default" else (path.parent / sweep.base)
    base_tree = read_yaml(base_path)
    for assignment in sweep.overrides:
        apply_override(base_tree, assignment)
    if sweep.tracking is not None:
        base_tree["tracking"] = {**base_tree.get("tracking", {}), **sweep.tracking.model_dump(exclude_unset=True)}
    resolve_inputs(base_tree, base_path.parent if sweep.base != "default" else Path.cwd())
    problems: list[str] = []
    base = None
    try:
        base = validate_tree(base_tree, str(base_path))
    except ConfigError as exc:
        problems += [f"base {base_path.name}: {p}" for p in exc.problems]
    points = expand_variants(sweep.search)
    valid, unvalidated = 0, []  # trials that validate; (trial, why it has no validation data)
    for index, (values, randoms) in enumerate(points):
        # Random entries are checked at both ends of their range (and every choice).
        extremes = [dict(zip(randoms, combo)) for combo in itertools.product(*(_distribution_extremes(d) for d in randoms.values()))] or [{}]
        for extreme in extremes:
            label = f"trial {index} ({_label({**values, **extreme})})"
            try:
                trial = validate_tree(_apply(base_tree, {**values, **extreme}), str(path))
            except ConfigError as exc:
                problems += [f"{label}: {p}" for p in exc.problems]
                continue
            valid += 1
            if (why := missing_validation(trial.data)) is not None:
                unvalidated.append((label, why))
    # Trials without validation data would report no metric to rank (a 0.0 would have won).
    metric = sweep.scheduler.metric
    if unvalidated and len(unvalidated) == valid:  # all of them: once, not once per trial
        problems.append(f"scheduler.metric: sweep metric {metric} needs validation data: {unvalidated[0][1]}")
    else:
        problems += [f"{label}: sweep metric {metric} needs validation data: {why}" for label, why in unvalidated]
    if base is not None and sweep.scheduler.metric not in VALIDATION_METRICS[base.training.stage]:
        problems.append(f"scheduler.metric: {sweep.scheduler.metric!r} is not reported by the {base.training.stage} stage "
                        f"(it reports {', '.join(VALIDATION_METRICS[base.training.stage])})")
    if base is not None and sweep.scheduler.type == "asha":
        t = base.training
        if t.eval_every is None:
            problems.append("base training.eval_every: must be set so that ASHA sees the validation metric during training")
        elif t.checkpoint_every is not None and t.checkpoint_every % t.eval_every:
            # Every report to Tune must carry the metric: checkpoints are reports too.
            problems.append(f"base training.checkpoint_every: must be a multiple of eval_every={t.eval_every} so that every "
                            f"report carries {sweep.scheduler.metric}, got {t.checkpoint_every}")
    if problems:
        raise ConfigError(str(path), list(dict.fromkeys(problems)))
    return LoadedSweep(path=str(path), sweep=sweep, base_tree=base_tree, points=points)


def is_sweep_file(path: str | Path) -> bool:
    """Sweep files have a search/scheduler section; experiment files have training/model."""
    try:
        tree = read_yaml(path)
    except ConfigError:
        return False
    return isinstance(tree, dict) and bool({"search", "scheduler", "base"} & set(tree)) and "training" not in tree


def trial_config(base_tree: dict, overrides: dict[str, Any], run_name: str) -> ExperimentConfig:
    tree = _apply(base_tree, overrides)
    tree.setdefault("tracking", {})["run_name"] = run_name
    return validate_tree(tree, run_name)


# Fields that decide a trial's processes and resources: searched, they rule out training in the trial.
PLACEMENT_FIELDS = ("training.num_workers", "training.resources_per_worker", "training.shard_one_worker")


def trains_in_trial(loaded: LoadedSweep, base: ExperimentConfig) -> bool:
    """Whether every trial is one unsharded worker with the same resources, so that the trial
    function can train in its own process (orchestrator.sweep.trial) instead of starting a
    TorchTrainer (a sharded single worker needs Train's process group)."""
    searched = {key for fixed, randoms in loaded.points for key in (*fixed, *randoms)}
    return (base.training.num_workers == 1 and not base.training.shard_one_worker
            and not any(key.startswith(PLACEMENT_FIELDS) for key in searched))
