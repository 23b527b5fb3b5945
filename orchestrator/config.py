"""The one experiment schema, composed from the sections each package owns.

    experiment.yaml ──► load_experiment(path, overrides) ──► ExperimentConfig (validated)

Overrides are dotted ``key=value`` strings whose values are parsed as YAML
(``training.alpha=0.6``, ``training.tau=null``). Every problem is reported at once, one line each,
naming the field path: ``training.alpha: must be ≤ 1, got 1.5``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from evaluation.config import EvaluationConfig
from trainers.config import (DataConfig, ModelConfig, Section, TokenizerConfig, TrainingConfig, config_problems, flatten,
                             model_training_problems, training_data_problems)
from trainers.errors import UserFacingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI: 'sqlite:///file.db' or 'http://host:5000'. "
        f"Default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI} in the working directory.",
    )
    experiment_name: str = Field("trdpo", description="MLflow experiment that holds the runs.")
    run_name: str | None = Field(None, description="Name of the run; re-running with the same name resumes it.")
    output_dir: str = Field(
        default_factory=lambda: os.environ.get("TRDPO_OUTPUT_DIR", "trdpo_runs"),
        description="Where checkpoints and exported models are written (default: $TRDPO_OUTPUT_DIR, else ./trdpo_runs). "
        "On a multi-node cluster use storage every node can reach.",
    )

    def resolved_tracking_uri(self) -> str:
        """The URI with local paths made absolute: Ray workers and Tune trials run elsewhere."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        if "://" not in uri:
            return str(Path(uri).resolve())
        return uri


class StageVariant(Section):
    """One training run of the pipeline: a name and the config fields it changes."""

    name: str = Field(description="Short name, e.g. 'dpo', 'trdpo-soft' (used in run names and tables).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted field -> value, applied to the experiment.")


class SFTStage(Section):
    enabled: bool = Field(False, description="Supervised fine-tuning on chosen responses first; variants start from it.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted field -> value for the SFT run (e.g. learning rate, steps).")


class PipelineConfig(Section):
    """What ``trdpo run`` does: [sft] -> train each variant -> generate -> judge -> report."""

    sft: SFTStage = Field(default_factory=SFTStage, description="The optional SFT stage.")
    variants: list[StageVariant] = Field(
        default_factory=list, description="Training variants; empty = one run of the training section as written."
    )
    dpo_variant: str | None = Field("dpo", description="Variant that is vanilla DPO: the others are also compared with it.")
    seeds: list[int] | None = Field(
        None, description="Repeat every variant with each of these training seeds (data order, dropout); comparisons are "
        "paired by seed and prompt. The SFT stage runs once and is shared: it is the common starting point every variant "
        "is judged against, so its own randomness is not part of the TR-DPO vs DPO question. Default: training.seed once.")


class ExperimentConfig(Section):
    """A whole TR-DPO experiment."""

    name: str = Field("trdpo-experiment", description="Human-readable experiment name.")
    model: ModelConfig = Field(description="The policy model.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer.")
    data: DataConfig = Field(description="Preference data.")
    training: TrainingConfig = Field(description="Optimisation and the reference-update rule.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Sampling and judging.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow and output locations.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Stages of `trdpo run`.")

    @model_validator(mode="after")
    def _pipeline_variants(self) -> "ExperimentConfig":
        names = [v.name for v in self.pipeline.variants]
        problems = []
        if len(set(names)) != len(names):
            problems.append(("pipeline.variants", f"names must be unique, got {names}"))
        seeds = self.pipeline.seeds
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
            problems.append(("pipeline.seeds", f"must be distinct seeds, at least one, got {seeds}"))
        if isinstance(self.evaluation.checkpoints, int) and self.training.max_steps is None:
            problems.append(("evaluation.checkpoints", "every N steps needs training.max_steps (or list the steps)"))
        if self.pipeline.variants and self.pipeline.dpo_variant and self.pipeline.dpo_variant not in names:
            problems.append(("pipeline.dpo_variant", f"{self.pipeline.dpo_variant!r} is not a variant name ({names}); set null for none"))
        problems += training_data_problems(self.training, self.data)
        problems += model_training_problems(self.model, self.training)
        if problems:
            raise config_problems(*problems)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat_params(self) -> dict[str, Any]:
        """All resolved values as ``{"training.alpha": 0.6, ...}`` (for MLflow params)."""
        return flatten(self.model_dump(mode="json"))


class ConfigError(UserFacingError):
    """A config that cannot be used; ``problems`` holds one ``field.path: message`` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid config\n" + "\n".join(f"  {p}" for p in problems))


def default_config_path() -> Path:
    """The embedded default experiment (offline demo: tiny model, synthetic data)."""
    return Path(str(resources.files("orchestrator") / "defaults" / "demo.yaml"))


def set_value(tree: dict, dotted: str, value: Any, source: str = "--set") -> None:
    """Set ``a.b.c`` in a raw config dict to ``value`` (creating sections as needed)."""
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(source, [f"{dotted}: empty path component"])
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(source, [f"{dotted}: '{part}' is a value, not a section"])
        node = child
    node[parts[-1]] = value


def set_values(tree: dict, values: dict[str, Any], source: str = "--set") -> None:
    for dotted, value in values.items():
        set_value(tree, dotted, value, source)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config dict (values are YAML)."""
    if "=" not in assignment:
        raise ConfigError("--set", [f"{assignment}: expected key=value"])
    key, raw = assignment.split("=", 1)
    set_value(tree, key, yaml.safe_load(raw) if raw.strip() else None)


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (for 'did you mean' hints)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _describe(error: dict) -> list[tuple[tuple, str]]:
    """Turn one pydantic error into ``(location, message)`` pairs in our wording."""
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "config_problems":
        return [(loc + tuple(field.split(".")), message) for field, message in ctx["problems"]]
    if kind == "extra_forbidden":
        known = _known_fields(ExperimentConfig, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(known)})" if known else ""
        if loc[-1] == "api_key":
            suffix = " (never put keys in a config: set api_key_env to the name of an environment variable)"
        return [(loc, f"unknown key{suffix}")]
    if kind == "missing":
        return [(loc, "required, but missing")]
    bounds = {
        "less_than_equal": ("≤", "le"),
        "less_than": ("<", "lt"),
        "greater_than_equal": ("≥", "ge"),
        "greater_than": (">", "gt"),
    }
    if kind in bounds:
        symbol, key = bounds[kind]
        return [(loc, f"must be {symbol} {ctx[key]}, got {given!r}")]
    if kind == "literal_error":
        return [(loc, f"must be one of {ctx['expected']}, got {given!r}")]
    return [(loc, f"{error['msg'][0].lower()}{error['msg'][1:]}, got {given!r}")]


def validate_tree(tree: Any, source: str) -> ExperimentConfig:
    if not isinstance(tree, dict):
        raise ConfigError(source, [f"<root>: expected a mapping of sections, got {type(tree).__name__}"])
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        lines: list[str] = []
        for error in exc.errors():
            for loc, message in _describe(error):
                line = f"{'.'.join(str(p) for p in loc) or '<root>'}: {message}"
                if line not in lines:
                    lines.append(line)
        raise ConfigError(source, lines) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["<file>: no such file"])
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"<file>: {where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return tree if tree is not None else {}


def load_experiment(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment file (the embedded default when ``path`` is None).
    Input paths written relative to the file are resolved here, once (see :func:`resolve_inputs`)."""
    path = Path(path) if path is not None else default_config_path()
    tree = read_yaml(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    resolve_inputs(tree, Path.cwd() if path == default_config_path() else path.parent)
    return validate_tree(tree, str(path))


# Fields that name something to read. Outputs (tracking.output_dir, a SQLite store, the judgment
# cache) stay as written and are made absolute against the working directory where they are used
# (in the driver), which is also what `trdpo submit` checks for durability.
INPUT_PATHS = ("data.path", "data.validation_path", "data.hf_dataset", "model.name_or_path", "model.reference_name_or_path",
               "tokenizer.name_or_path", "evaluation.prompts_path")


def resolve_inputs(tree: dict, base: Path) -> None:
    """Relative input paths of a raw config tree become absolute: against the config file's
    directory first, then the working directory, so that the driver and every worker (which runs
    elsewhere) read the same file. A name that exists in neither place is left alone when it can be
    a Hub name (``EleutherAI/pythia-2.8b``), else it is taken beside the config file (and the error
    that follows names that absolute path)."""
    for dotted in INPUT_PATHS:
        section, key = dotted.split(".")
        value = (tree.get(section) or {}).get(key) if isinstance(tree.get(section), dict) else None
        if isinstance(value, str):
            tree[section][key] = resolve_input_path(value, base, is_file=key in ("path", "validation_path", "prompts_path"))


def resolve_input_path(value: str, base: Path, is_file: bool = False) -> str:
    """One input path of a config file (experiment, sweep or eval file), made absolute: against the
    file's directory ``base`` first, then the working directory. URIs and absolute paths are kept.
    A path found in neither place stays as written when it can be a Hub name (a model), unless it
    is explicitly relative (``./``, ``../``) or ``is_file`` (data, prompts): then it is taken
    beside the config file, so the error that follows names that absolute path."""
    if not value or "://" in value or Path(value).expanduser().is_absolute():
        return value
    for candidate in (base / value, Path.cwd() / value):
        if candidate.exists():
            return str(candidate.resolve())
    if value.startswith(".") or is_file:
        return str((base / value).resolve())
    return value


@dataclass(frozen=True)
class FieldHelp:
    path: str
    type: str
    default: Any
    description: str


def field_help(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[FieldHelp]:
    """Every config field with its type, default and help text: the source of ``trdpo fields``."""
    rows: list[FieldHelp] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        path = f"{prefix}{name}"
        if nested:
            rows.extend(field_help(nested[0], f"{path}."))
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        type_name = str(annotation).replace("typing.", "") if not isinstance(annotation, type) else annotation.__name__
        rows.append(FieldHelp(path, type_name, "<required>" if field.is_required() else default, field.description or ""))
    return rows
