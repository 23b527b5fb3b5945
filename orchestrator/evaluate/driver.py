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
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from evaluation.config import EvaluationConfig, ModelRef
from evaluation.pool import GenerationPool, JudgePool, sampled_kl_with_pool
from orchestrator.config import TrackingConfig, flatten
from orchestrator.evaluate.comparison import ComparisonSummary, compare
from orchestrator.evaluate.preflight import check_judge, check_models, judge_templates
from orchestrator.evaluate.summary import log_summary
from orchestrator.tracking import configure_tracking, log_params
from trainers.state.storage import Storage, is_remote


def resolve_model(ref: ModelRef, client: MlflowClient, work_dir: Path) -> str:
    if ref.path:
        return ref.path
    target = work_dir / f"model-{ref.mlflow_run_id}"
    if not (target / "policy" / "config.json").exists():
        client.download_artifacts(ref.mlflow_run_id, "policy", str(target))
    return str(target / "policy")



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
                          tags={"trdpo.kind": "eval", **tags}) as parent, JudgePool(cache_path, cfg.num_judge_actors) as judges:
        try:
            log_params(flatten(cfg.model_dump(mode="json")), parent.info.run_id, client)
            for policy in cfg.policies:
                extra_tags = {**tags, **policy_tags.get(policy.name, {})}
                summaries.append(compare(policy, cfg, prompts, samples[policy.name], baseline_samples, templates,
                                         judges, client, experiment.experiment_id, parent.info.run_id, out_dir,
                                         extra_tags, kls.get(policy.name, {})))
            log_summary(summaries, cfg, out_dir)
        except BaseException:
            for child in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
                if child.info.status == "RUNNING":
                    client.set_terminated(child.info.run_id, "FAILED")
            raise
    return summaries

