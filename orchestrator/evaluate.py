"""``trdpo eval``: sample from policies and a baseline on an actor pool, judge them, log to MLflow.

    eval.yaml ─► prompts (held-out split of an experiment's data, or a JSONL file)
              ─► generation actors: samples of every policy and of the baseline
              ─► judge actors: policy vs baseline (both orders), and per human-centric criterion
              ─► metrics: win rate + bootstrap CI, ties, flips, failures, length control, diversity
              ─► MLflow: a parent run, one child run per comparison (tagged with the training run it
                 evaluates), per-example table, samples, plots
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evaluation.config import EvaluationConfig, ModelRef
from evaluation.judges import JudgeUnavailable, PythonScorer, describe_judge, is_pairwise, load_template, read_api_key
from evaluation.metrics import distinct_n, length_controlled, mean_entropy, mean_length, self_bleu, win_rate
from evaluation.pool import GenerationPool, judge_with_pool, sampled_kl_with_pool
from evaluation.protocol import Item
from orchestrator.config import ConfigError, ExperimentConfig, TrackingConfig, flatten, load_experiment, read_yaml
from orchestrator.consumers import missing_validation
from orchestrator.tracking import configure_tracking
from trainers.storage import Storage, is_remote


class EvalFile(BaseModel):
    """An evaluation file: what to compare, on which prompts, judged how, tracked where."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("eval", description="Name of the evaluation (MLflow parent run).")
    experiment: str | None = Field(None, description="Experiment file whose held-out split gives the prompts (relative to this file).")
    evaluation: EvaluationConfig = Field(description="Policies, baseline, prompts, sampling and judge.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow and output locations.")


def is_eval_file(path: str | Path) -> bool:
    """Evaluation files have an ``evaluation`` section and no ``training`` section."""
    try:
        tree = read_yaml(path)
    except ConfigError:
        return False
    return isinstance(tree, dict) and "evaluation" in tree and "training" not in tree


def load_eval_file(path: str | Path) -> tuple[EvalFile, ExperimentConfig | None]:
    path = Path(path)
    tree = read_yaml(path)
    try:
        config = EvalFile.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(str(path), [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    experiment = load_experiment(path.parent / config.experiment) if config.experiment else None
    if config.evaluation.prompts_path and not Path(config.evaluation.prompts_path).is_absolute():
        config.evaluation.prompts_path = str((path.parent / config.evaluation.prompts_path).resolve())
    for ref in [*config.evaluation.policies, *( [config.evaluation.baseline] if config.evaluation.baseline else [])]:
        if ref.path and (path.parent / ref.path).exists() and not Path(ref.path).is_absolute():
            ref.path = str((path.parent / ref.path).resolve())
    if not config.evaluation.policies or config.evaluation.baseline is None:
        raise ConfigError(str(path), ["evaluation.policies / evaluation.baseline: an eval file needs both"])
    return config, experiment


def eval_prompts(cfg: EvaluationConfig, experiment: ExperimentConfig | None) -> list[tuple[str, str]]:
    """``(prompt_id, text)`` for the first ``num_prompts`` prompts of the file or held-out split."""
    if cfg.prompts_path:
        return _prompts_file(cfg.prompts_path)[: cfg.num_prompts]
    if experiment is None:
        raise ConfigError("evaluation", ["prompts: set evaluation.prompts_path or name an experiment for its held-out split"])
    why = missing_validation(experiment.data)
    if why:
        raise ConfigError("evaluation", [f"prompts: evaluation.prompts_path is not set and the experiment has no held-out "
                                         f"split to take them from: {why}"])
    from trainers.data import load_examples, render
    from trainers.models import build_tokenizer

    examples, _ = load_examples(experiment.data, "validation")
    tokenizer = build_tokenizer(experiment.model, experiment.tokenizer)
    prompts, seen = [], set()
    for example in examples:
        text = render(tokenizer, example.prompt, example.chosen)[0]
        if text not in seen:  # held-out pairs often share prompts; judge each once per sample
            seen.add(text)
            prompts.append((f"row{example.row}", text))
    if not prompts:
        raise ConfigError("evaluation", ["prompts: the experiment's held-out split has no usable rows"])
    return prompts[: cfg.num_prompts]


def _prompts_file(path: str) -> list[tuple[str, str]]:
    """``(id, prompt)`` of a JSONL file of ``{"prompt": ..., "id": ...}`` rows; errors name the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(path, ["evaluation.prompts_path: no such file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"evaluation.prompts_path: not UTF-8 text (byte {exc.start})"]) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(path, [f"line {number}: not a JSON object ({exc})"]) from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(path, [f"line {number}: needs a string 'prompt'"])
        prompts.append((str(row.get("id", len(prompts) + 1)), row["prompt"]))
    if not prompts:
        raise ConfigError(path, ["evaluation.prompts_path: no prompts in the file"])
    return prompts


def check_models(cfg: EvaluationConfig) -> None:
    """Every local policy and baseline path is a model directory: found here, in one line, not
    as a traceback from a generation actor after the other models were sampled."""
    for field, ref in [*((f"evaluation.policies[{i}]", p) for i, p in enumerate(cfg.policies)), ("evaluation.baseline", cfg.baseline)]:
        if ref is None or not ref.path:
            continue
        found = Storage(ref.path).exists("config.json") if is_remote(ref.path) else (Path(ref.path).expanduser() / "config.json").is_file()
        if not found:
            raise ConfigError("evaluation", [f"{field}.path: {ref.path!r} is not a model directory (no config.json)"])


def resolve_model(ref: ModelRef, client: MlflowClient, work_dir: Path) -> str:
    if ref.path:
        return ref.path
    target = work_dir / f"model-{ref.mlflow_run_id}"
    if not (target / "policy" / "config.json").exists():
        client.download_artifacts(ref.mlflow_run_id, "policy", str(target))
    return str(target / "policy")


@dataclass
class ComparisonSummary:
    policy: str
    baseline: str
    run_id: str
    metrics: dict[str, float]


def _diversity(samples: list, prefix: str) -> dict[str, float]:
    texts = [s.response for s in samples]
    return {f"{prefix}self_bleu": self_bleu(texts), f"{prefix}distinct_1": distinct_n(texts, 1),
            f"{prefix}distinct_2": distinct_n(texts, 2), f"{prefix}mean_entropy": mean_entropy([[s.mean_entropy] for s in samples if s.mean_entropy is not None]),
            f"{prefix}mean_length_words": mean_length(texts)}


def judge_templates(cfg: EvaluationConfig) -> list[str]:
    """The main template, then one per criterion (``*_score`` when criteria are rated 1-10)."""
    return [cfg.judge.template] + [f"{c}_score" if cfg.criteria_mode == "score" else c for c in cfg.criteria]


def check_judge(cfg: EvaluationConfig) -> None:
    """What can be known about the judge without calling it, checked before any sample is
    generated (sampling can take hours; a missing key should not wait for it): the API key's
    variable is set, the templates exist, a python scorer imports."""
    if cfg.judge.backend == "openai":
        read_api_key(cfg.judge)
    if is_pairwise(cfg.judge):
        for template in judge_templates(cfg):
            load_template(template)
    if cfg.judge.backend == "python":
        PythonScorer(cfg.judge)


def run_evaluation(cfg: EvaluationConfig, tracking: TrackingConfig, name: str, prompts: list[tuple[str, str]],
                   parent_run_id: str | None = None, num_cpus_per_actor: float = 1.0, tags: dict[str, str] | None = None,
                   policy_tags: dict[str, dict[str, str]] | None = None, kl_reference: str | None = None) -> list[ComparisonSummary]:
    """Sample, judge and log every policy of ``cfg`` against its baseline.

    ``tags`` go on every run (the study a comparison belongs to), ``policy_tags[name]`` on that
    policy's comparison run (variant, seed, step); with ``kl_reference`` (a model directory) each
    policy also gets a sampled KL from it (eval/kl, from its own samples at temperature 1)."""
    from orchestrator.ray_train import connect

    check_judge(cfg)
    check_models(cfg)
    uri = configure_tracking(tracking)
    connect(None)
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name)
    client = MlflowClient(uri)
    out_dir = Path(tempfile.gettempdir()) / "trdpo-eval-models" / name  # models fetched from MLflow runs
    out_dir.mkdir(parents=True, exist_ok=True)
    with judgment_cache(cfg.cache_path or Storage(tracking.output_dir).uri_of("judgments.sqlite")) as cache_path:
        return _run_evaluation(cfg, name, prompts, parent_run_id, num_cpus_per_actor, client, experiment, out_dir, cache_path,
                               tags or {}, policy_tags or {}, kl_reference)


_SAMPLES: dict[str, list] = {}  # this process's samples by (model, prompts, sampling): the same draw twice is the same


def _samples(pool, path: str, prompts: list[tuple[str, str]], sampling, label: str) -> list:
    """A model's samples, generated once per process: generation is deterministic for a model,
    prompts and sampling settings, so a model judged in two comparisons (a variant vs SFT and vs
    DPO) is sampled once."""
    key = json.dumps([path, prompts, sampling.model_dump(mode="json")])
    if key not in _SAMPLES:
        _SAMPLES[key] = pool.generate(path, prompts, sampling, f"generate {label}")
    return _SAMPLES[key]


@contextlib.contextmanager
def judgment_cache(location: str):
    """The SQLite judgment cache as a local file: ``location`` itself, or for an object-store URI
    a local copy (fetched first, written back afterwards, also after a failure: paid judgments are
    never lost)."""
    if not is_remote(location):
        path = Path(location).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        yield str(path)
        return
    parent, name = location.rsplit("/", 1)
    store = Storage(parent)
    with tempfile.TemporaryDirectory(prefix="trdpo-judgments-") as tmp:
        local = Path(tmp) / name
        if store.exists(name):
            local.write_bytes(store.read_bytes(name))
        try:
            yield str(local)
        finally:
            if local.exists():
                store.put_file(local, name)


def _run_evaluation(cfg: EvaluationConfig, name: str, prompts, parent_run_id, num_cpus_per_actor, client, experiment, out_dir,
                    cache_path: str, tags: dict, policy_tags: dict, kl_reference: str | None) -> list[ComparisonSummary]:
    models = {ref.name: resolve_model(ref, client, out_dir) for ref in [cfg.baseline, *cfg.policies]}
    with GenerationPool(cfg.num_generation_actors, num_cpus_per_actor) as pool:
        samples = {label: _samples(pool, path, prompts, cfg.sampling, label) for label, path in models.items()}
    kls = {}
    if kl_reference is not None:
        kls = sampled_kl_with_pool({p.name: models[p.name] for p in cfg.policies}, kl_reference, prompts, cfg.kl_samples,
                                   cfg.sampling.max_new_tokens, seed=cfg.sampling.seed, cpus_per_task=num_cpus_per_actor)
    baseline_samples = samples[cfg.baseline.name]
    templates = judge_templates(cfg)
    summaries = []
    with mlflow.start_run(run_name=name, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags={"trdpo.kind": "eval", **tags}) as parent:
        try:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump(mode="json")).items()})
            for policy in cfg.policies:
                extra_tags = {**tags, **policy_tags.get(policy.name, {})}
                summaries.append(_compare(policy, cfg, prompts, samples[policy.name], baseline_samples, templates,
                                          cache_path, client, experiment.experiment_id, parent.info.run_id, out_dir,
                                          extra_tags, kls.get(policy.name, {})))
            _parent_artifacts(summaries, cfg, out_dir)
        except BaseException:
            for child in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
                if child.info.status == "RUNNING":
                    client.set_terminated(child.info.run_id, "FAILED")
            raise
    return summaries


def _compare(policy: ModelRef, cfg: EvaluationConfig, prompts, policy_samples, baseline_samples, templates, cache_path,
             client: MlflowClient, experiment_id: str, parent_run_id: str, out_dir: Path, extra_tags: dict | None = None,
             kl_metrics: dict | None = None) -> ComparisonSummary:
    label = f"{policy.name} vs {cfg.baseline.name}"
    tags = {"mlflow.parentRunId": parent_run_id, "trdpo.kind": "eval", "trdpo.role": "comparison", "trdpo.policy": policy.name,
            "trdpo.baseline": cfg.baseline.name, "trdpo.template": cfg.judge.template, **(extra_tags or {})}
    for role, ref in (("policy", policy), ("baseline", cfg.baseline)):
        if ref.mlflow_run_id:
            tags[f"trdpo.{role}_train_run"] = ref.mlflow_run_id
    run = client.create_run(experiment_id, run_name=label, tags=tags)
    items = [Item(f"{p.prompt_id}#{p.sample_index}", p.prompt, p.response, b.response)
             for p, b in zip(policy_samples, baseline_samples)]
    metrics: dict[str, float] = dict(kl_metrics or {})
    per_item: dict[str, dict] = {item.item_id: {"prompt": item.prompt, "policy": item.policy, "baseline": item.baseline} for item in items}
    for template in templates:
        judge_cfg = cfg.judge.model_copy(update={"template": template})
        mode = "score" if template.endswith("_score") else "pairwise"
        results, calls = judge_with_pool(items, judge_cfg, cache_path, cfg.num_judge_actors,
                                         both_orders=cfg.judge.both_orders and is_pairwise(cfg.judge), seed=cfg.sampling.seed,
                                         label=f"judge {label} [{template}]", mode=mode)
        outcomes = [r.to_outcome() for r in results]
        summary = win_rate(outcomes, resamples=cfg.bootstrap_resamples, seed=cfg.sampling.seed)
        prefix = "eval/" if template == cfg.judge.template else f"eval/{template.removesuffix('_score')}/"
        if summary.total and not summary.n:
            # Every call failed or said nothing parseable: a number here ("win rate nan") would
            # read as a finished evaluation. The judgments that did come back are cached.
            first_error = next((e for r in results for e in r.errors), "none recorded")
            failure = " ".join(
                f"{describe_judge(judge_cfg)}: no judgment succeeded for {label} [{template}] "
                f"({summary.api_errors} API errors, {summary.parse_failures} parse failures of {summary.total}; "
                f"first error: {first_error})".split())
            if template == cfg.judge.template:
                raise JudgeUnavailable(failure)
            # A criterion is a side result: its rates are absent (not 0), the counts say why.
            print(f"[eval] warning: {failure}; no {prefix}win_rate", file=sys.stderr, flush=True)
        if mode == "score":
            for role in ("policy", "baseline"):
                values = [getattr(r, f"{role}_score") for r in results if getattr(r, f"{role}_score") is not None]
                metrics[f"{prefix}{role}_score_mean"] = sum(values) / len(values) if values else float("nan")
        latencies = [r.latency_s for r in results if r.judge_calls and not r.cached]
        metrics.update({
            f"{prefix}judge_latency_s_mean": sum(latencies) / len(latencies) if latencies else float("nan"),
            f"{prefix}win_rate": summary.win_rate, f"{prefix}win_rate_se": summary.standard_error,
            f"{prefix}win_rate_ci_low": summary.ci_low, f"{prefix}win_rate_ci_high": summary.ci_high,
            f"{prefix}wins": summary.wins, f"{prefix}losses": summary.losses, f"{prefix}ties": summary.ties,
            f"{prefix}parse_failures": summary.parse_failures, f"{prefix}api_errors": summary.api_errors,
            f"{prefix}flip_rate": summary.flip_rate, f"{prefix}comparisons": summary.total,
            f"{prefix}judge_calls": calls, f"{prefix}cached_judgments": sum(r.cached for r in results),
            f"{prefix}judge_tokens": sum(r.usage_tokens for r in results),
        })
        if template == cfg.judge.template:
            # The minimal AlpacaEval 2 length model (no L1 penalty, instruction difficulty or
            # baseline regulariser: see evaluation.metrics.length_controlled), with a bootstrap CI.
            lc = length_controlled(outcomes, resamples=cfg.bootstrap_resamples, seed=cfg.sampling.seed)
            metrics.update(lc.as_metrics())
            if lc.separated:
                print(f"[eval] warning: {label}: wins separate perfectly by response length, so the length-controlled "
                      f"fit diverges; eval/lc_win_rate is not identified (CI [0, 1], eval/lc_separated = 1)",
                      file=sys.stderr, flush=True)
        for r in results:
            per_item[r.item_id].update({f"{template}_outcome": r.outcome, f"{template}_verdicts": json.dumps(r.verdicts),
                                        f"{template}_errors": "; ".join(r.errors)})
            if r.policy_score is not None:
                per_item[r.item_id].update(policy_score=r.policy_score, baseline_score=r.baseline_score)
    metrics.update(_diversity(policy_samples, "diversity/policy/"))
    metrics.update(_diversity(baseline_samples, "diversity/baseline/"))
    metrics["eval/avg_len_policy"] = mean_length(s.response for s in policy_samples)
    metrics["eval/avg_len_baseline"] = mean_length(s.response for s in baseline_samples)
    # A metric with no samples is NaN up to here: absent from now on (MLflow, the summary, the study).
    metrics = {k: float(v) for k, v in metrics.items() if v == v}
    client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        samples_path = Path(tmp) / "samples.jsonl"
        with samples_path.open("w", encoding="utf-8") as handle:
            for which, group in (("policy", policy_samples), ("baseline", baseline_samples)):
                for s in group:
                    handle.write(json.dumps({"model": which, **s.__dict__}) + "\n")
        client.log_artifact(run.info.run_id, str(samples_path))
    import pandas as pd

    client.log_table(run.info.run_id, pd.DataFrame([{"item_id": k, **v} for k, v in per_item.items()]), "examples.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"[eval] {label}: win rate {metrics['eval/win_rate']:.3f} "
          f"[{metrics['eval/win_rate_ci_low']:.3f}, {metrics['eval/win_rate_ci_high']:.3f}], "
          f"length-controlled {metrics['eval/lc_win_rate']:.3f} "
          f"[{metrics['eval/lc_win_rate_ci_low']:.3f}, {metrics['eval/lc_win_rate_ci_high']:.3f}], "
          f"ties {int(metrics['eval/ties'])}, parse failures {int(metrics['eval/parse_failures'])}, "
          f"API errors {int(metrics['eval/api_errors'])}", flush=True)
    return ComparisonSummary(policy.name, cfg.baseline.name, run.info.run_id, metrics)


def _parent_artifacts(summaries: list[ComparisonSummary], cfg: EvaluationConfig, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.DataFrame([{"policy": s.policy, "baseline": s.baseline, **{k: v for k, v in s.metrics.items()}} for s in summaries])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        table.to_csv(out / "summary.csv", index=False)
        mlflow.log_artifact(str(out / "summary.csv"))
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(summaries), 3.5))
        rates = [s.metrics["eval/win_rate"] for s in summaries]
        errors = [[r - s.metrics["eval/win_rate_ci_low"] for r, s in zip(rates, summaries)],
                  [s.metrics["eval/win_rate_ci_high"] - r for r, s in zip(rates, summaries)]]
        ax.bar([s.policy for s in summaries], rates, yerr=errors, capsize=6, color="#4c72b0")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"win rate vs {cfg.baseline.name} (95% CI)")
        ax.set_title(f"judge: {cfg.judge.backend} / {cfg.judge.template}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "win_rates.png", dpi=120)
        plt.close(fig)
        mlflow.log_artifact(str(out / "win_rates.png"), artifact_path="plots")
        if cfg.criteria:
            fig, ax = plt.subplots(figsize=(2 + 1.4 * len(cfg.criteria), 3.5))
            width = 0.8 / len(summaries)
            for i, s in enumerate(summaries):
                ax.bar([c + i * width for c in range(len(cfg.criteria))],
                       [s.metrics.get(f"eval/{c}/win_rate", float("nan")) for c in cfg.criteria], width, label=s.policy)
            ax.set_xticks([c + width * (len(summaries) - 1) / 2 for c in range(len(cfg.criteria))], cfg.criteria, rotation=20)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"win rate vs {cfg.baseline.name}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "criteria.png", dpi=120)
            plt.close(fig)
            mlflow.log_artifact(str(out / "criteria.png"), artifact_path="plots")
