"""``trdpo run``: one experiment end to end.

    [sft] ─► train each variant (vanilla DPO, TR-DPO soft, TR-DPO hard, ...) from the SFT model
          ─► generate + judge: every variant vs SFT, and every other variant vs vanilla DPO
          ─► report: win rates with CIs, per-criterion scores, diversity, final KL to the initial
             model and peak gradient norm, printed and logged

One MLflow parent run holds a child run per stage and variant. Re-running the command skips what
is done by the same rule everywhere: a training run that finished with the same fingerprint is
not trained again, one that was interrupted continues from its newest complete checkpoint, one
whose settings changed is refused naming the fields (``--restart`` trains everything over); an
evaluation stage is skipped when ``<output_dir>/<name>/pipeline_state.json`` records it done with
the same inputs (evaluation settings and trained runs).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from orchestrator.config import ExperimentConfig, StageVariant, set_values, validate_tree
from orchestrator.tracking import tracked_run
from trainers.storage import Storage


class PipelineState:
    """What each evaluation stage produced and from which inputs, so that a rerun can skip it.
    (Training stages need no record: a finished run with the same fingerprint is not trained
    again, see orchestrator.train.)"""

    def __init__(self, store: Storage, name: str = "pipeline_state.json"):
        self.store, self.name = store, name
        self.data: dict[str, Any] = json.loads(store.read_text(name)) if store.exists(name) else {"stages": {}}

    def save(self) -> None:
        self.store.write_text(json.dumps(self.data, indent=2), self.name)

    def done(self, stage: str, inputs: str) -> dict | None:
        record = self.data["stages"].get(stage)
        return record if record and record.get("inputs") == inputs else None

    def record(self, stage: str, inputs: str, **values) -> None:
        self.data["stages"][stage] = {"inputs": inputs, **values}
        self.save()


def derive(config: ExperimentConfig, overrides: dict[str, Any], run_name: str, start_model: str | None) -> ExperimentConfig:
    """The experiment with ``overrides`` applied, named ``run_name``, optionally starting from a
    model directory (the SFT stage's export, which also holds the tokenizer)."""
    tree = config.model_dump(mode="json")
    tree["pipeline"] = {}
    if start_model is not None:
        tree["model"] = {**tree["model"], "tiny": None, "name_or_path": start_model}
        tree["tokenizer"] = {**tree["tokenizer"], "kind": "pretrained", "name_or_path": start_model}
    set_values(tree, overrides)
    tree["tracking"]["run_name"] = run_name
    return validate_tree(tree, run_name)


def _train(config: ExperimentConfig, address: str | None, parent_run_id: str, use_ray: bool, restart: bool) -> dict:
    if use_ray:
        from orchestrator.ray_train import run_on_ray

        result = run_on_ray(config, address=address, parent_run_id=parent_run_id, restart=restart)
    else:
        from orchestrator.train import run_local

        result = run_local(config, parent_run_id=parent_run_id, restart=restart)
    return {"run_id": result.run_id, "model_dir": result.model_dir, "metrics": result.metrics}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(config: ExperimentConfig, address: str | None = None, use_ray: bool = True, restart: bool = False) -> dict:
    store = Storage(config.tracking.output_dir).child(config.name)
    if restart:
        store.remove("pipeline_state.json")
    state = PipelineState(store)
    previous_parent = state.data.get("parent_run_id")
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    if previous_parent:
        try:
            client.get_run(previous_parent)
        except Exception:  # noqa: BLE001 - a state file from another tracking store: start a new parent
            previous_parent = None
    with tracked_run(config, config.name, tags={"trdpo.kind": "experiment"}, run_id=previous_parent) as parent:
        state.data["parent_run_id"] = parent.info.run_id
        state.save()
        train = lambda cfg: _train(cfg, address, parent.info.run_id, use_ray, restart)  # noqa: E731

        start_model = None
        if config.pipeline.sft.enabled:
            sft_overrides = {"training.stage": "sft", "training.ref_update": "none", "training.alpha": None,
                             "training.tau": None, **config.pipeline.sft.overrides}
            print("[trdpo] stage sft", flush=True)
            start_model = train(derive(config, sft_overrides, f"{config.name}-sft", None))["model_dir"]

        variants = config.pipeline.variants or [StageVariant(name="train")]  # the training section as written
        trained = {}
        for variant in variants:
            print(f"[trdpo] stage train:{variant.name}", flush=True)
            trained[variant.name] = train(derive(config, variant.overrides, f"{config.name}-{variant.name}", start_model))

        comparisons = []
        if config.evaluation.enabled:
            comparisons = _evaluate(config, state, store, start_model, trained, parent.info.run_id)
        table = report(config, trained, comparisons, client)
        return {"parent_run_id": parent.info.run_id, "trained": trained, "comparisons": comparisons, "table": table}


def _initial_model(config: ExperimentConfig, store: Storage) -> str:
    """The untrained starting model as a model directory (the baseline when there is no SFT)."""
    if config.model.name_or_path:
        return config.model.name_or_path
    if not store.exists("initial", "config.json"):
        from trainers.models import build_policy, build_tokenizer

        tokenizer = build_tokenizer(config.model, config.tokenizer)
        with tempfile.TemporaryDirectory(prefix="trdpo-initial-") as tmp:
            build_policy(config.model, tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            store.put_dir(tmp, "initial")
    return store.uri_of("initial")


def _evaluate(config: ExperimentConfig, state: PipelineState, store: Storage, start_model: str | None, trained: dict,
              parent_run_id: str) -> list[dict]:
    from evaluation.config import ModelRef
    from orchestrator.evaluate import eval_prompts, run_evaluation

    if start_model is None:
        baseline = ModelRef(name="initial", path=_initial_model(config, store))
    else:
        baseline = ModelRef(name="sft", path=start_model)
    refs = {name: ModelRef(name=name, path=record["model_dir"]) for name, record in trained.items()}
    plans = [("vs-" + baseline.name, baseline, list(refs.values()))]
    dpo = config.pipeline.dpo_variant
    if dpo in refs and len(refs) > 1:
        plans.append((f"vs-{dpo}", refs[dpo], [r for n, r in refs.items() if n != dpo]))
    prompts = eval_prompts(config.evaluation, config)
    runs = {name: record["run_id"] for name, record in trained.items()}
    comparisons = []
    for plan_name, base_ref, policies in plans:
        stage = f"evaluate:{plan_name}"
        # The same evaluation settings on the same trained runs: nothing to redo.
        inputs = _digest({"evaluation": config.evaluation.model_dump(mode="json"), "baseline": base_ref.model_dump(),
                          "policies": [p.model_dump() for p in policies], "runs": runs})
        done = state.done(stage, inputs)
        if done:
            print(f"[trdpo] skipping stage {stage}: already done with these inputs (runs {done['run_id']})", flush=True)
            comparisons += done["comparisons"]
            continue
        print(f"[trdpo] stage {stage}", flush=True)
        cfg = config.evaluation.model_copy(update={"policies": policies, "baseline": base_ref})
        summaries = run_evaluation(cfg, config.tracking, f"{config.name}-{plan_name}", prompts, parent_run_id=parent_run_id)
        rows = [{"policy": s.policy, "baseline": s.baseline, "run_id": s.run_id, "metrics": s.metrics} for s in summaries]
        state.record(stage, inputs, run_id=",".join(r["run_id"] for r in rows), comparisons=rows)
        comparisons += rows
    return comparisons


def report(config: ExperimentConfig, trained: dict, comparisons: list[dict], client: MlflowClient):
    """The summary table: one row per variant; printed, and logged to the parent run."""
    import pandas as pd

    rows = []
    for name, record in trained.items():
        grad_norms = [m.value for m in client.get_metric_history(record["run_id"], "train/grad_norm")]
        kl = client.get_metric_history(record["run_id"], "val/kl_to_initial")
        row: dict[str, Any] = {"variant": name, "final val/kl_to_initial": kl[-1].value if kl else None,
                               "peak train/grad_norm": max(grad_norms) if grad_norms else None}
        for comparison in comparisons:
            if comparison["policy"] != name:
                continue
            m, base = comparison["metrics"], comparison["baseline"]
            row[f"win vs {base}"] = f"{m['eval/win_rate']:.3f} [{m['eval/win_rate_ci_low']:.3f}, {m['eval/win_rate_ci_high']:.3f}]"
            for criterion in config.evaluation.criteria:
                if f"eval/{criterion}/win_rate" in m:
                    row[f"{criterion} vs {base}"] = round(m[f"eval/{criterion}/win_rate"], 3)
            row.setdefault("distinct-2", round(m.get("diversity/policy/distinct_2", float("nan")), 3))
            row.setdefault("self-BLEU", round(m.get("diversity/policy/self_bleu", float("nan")), 2))
        rows.append(row)
    table = pd.DataFrame(rows)
    text = table.to_string(index=False)
    print("\n" + text + "\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "summary.csv", index=False)
        (Path(tmp) / "summary.txt").write_text(text + "\n")
        mlflow.log_artifact(str(Path(tmp) / "summary.csv"))
        mlflow.log_artifact(str(Path(tmp) / "summary.txt"))
    for comparison in comparisons:
        m = comparison["metrics"]
        mlflow.log_metric(f"summary/{comparison['policy']}_vs_{comparison['baseline']}/win_rate", m["eval/win_rate"])
    return table
