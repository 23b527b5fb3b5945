"""``trdpo run``: one experiment end to end, as a small study.

    [sft] (once, shared) ─► for each seed: train each variant (vanilla DPO, TR-DPO soft, hard, ...)
                            from the SFT model, exporting policies along the way
          ─► for each seed: every variant's policies (along the way and final) vs SFT, with a
             sampled KL from SFT; every final policy vs vanilla DPO's
          ─► report: one HTML study (win rates paired by seed and prompt, quality vs KL and the
             comparison at matched KL, per-criterion bars, gradient norm and KL over steps,
             diversity), rebuilt from MLflow alone (orchestrator.study.collect), plus a printed summary

One MLflow parent run holds a child run per training and evaluation, all tagged with the study.
Re-running the command skips what is done by the same rule everywhere: a training run that
finished with the same fingerprint is not trained again, one that was interrupted continues from
its newest complete checkpoint, one whose settings changed is refused naming the fields
(``--restart`` trains everything over); an evaluation stage is skipped when
``<output_dir>/<name>/pipeline_state.json`` records it done with the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, ExperimentConfig, StageVariant, set_values, validate_tree
from orchestrator.consumers import missing_validation
from orchestrator.study.publish import publish_report, summary_table
from orchestrator.tracking import check_tracking_server, has_run, tracked_run
from trainers.loop import POLICY, policy_at
from trainers.state.storage import Storage


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


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Trains one stage of the study, on Ray or in this process, tagged with the study."""

    def __init__(self, address: str | None, use_ray: bool, restart: bool, parent_run_id: str):
        self.address, self.use_ray, self.restart, self.parent_run_id = address, use_ray, restart, parent_run_id

    def __call__(self, config: ExperimentConfig, tags: dict[str, str]) -> dict:
        tags = {"trdpo.study": self.parent_run_id, **tags}
        if self.use_ray:
            from orchestrator.ray_train import run_on_ray

            result = run_on_ray(config, self.address, self.parent_run_id, self.restart, tags)
        else:
            from orchestrator.train import run_local

            result = run_local(config, self.parent_run_id, self.restart, tags)
        return {"run_id": result.run_id, "model_dir": result.model_dir, "run_uri": result.run_uri, "metrics": result.metrics}


def check_study(config: ExperimentConfig) -> None:
    """What the study needs beyond a valid experiment, refused before anything starts."""
    why = missing_validation(config.data)
    if config.evaluation.enabled and not config.evaluation.prompts_path and why:
        raise ConfigError(f"experiment {config.name}", [
            f"evaluation.prompts_path: not set, so the study would judge the prompts of the held-out split, but {why}; "
            "set evaluation.prompts_path or give the data a validation split"])


def run_pipeline(config: ExperimentConfig, address: str | None = None, use_ray: bool = True, restart: bool = False) -> dict:
    check_study(config)
    store = Storage(config.tracking.output_dir).child(config.name)
    if restart:
        store.remove("pipeline_state.json")
    state = PipelineState(store)
    previous_parent = state.data.get("parent_run_id")
    uri = config.tracking.resolved_tracking_uri()
    check_tracking_server(uri)  # seconds, not MLflow's minutes of retries, when the server is down
    client = MlflowClient(uri)
    if previous_parent and not has_run(client, previous_parent, uri):
        # The state file outlived its tracking store (or names another one): a new study run.
        print(f"[trdpo] the study's run {previous_parent} is not in {uri}; starting a new one", flush=True)
        previous_parent = None
    seeds = config.pipeline.seeds or [config.training.seed]
    variants = config.pipeline.variants or [StageVariant(name="train")]  # the training section as written
    along_the_way = config.evaluation.checkpoint_steps(config.training.max_steps or 0) if config.evaluation.enabled else []
    with tracked_run(config, config.name, tags={"trdpo.kind": "experiment", "trdpo.study": "self",
                                                "trdpo.study_baseline": "sft" if config.pipeline.sft.enabled else "initial",
                                                "trdpo.study_reference": config.pipeline.dpo_variant or ""},
                     run_id=previous_parent) as parent:
        state.data["parent_run_id"] = parent.info.run_id
        state.save()
        train = Trainer(address, use_ray, restart, parent.info.run_id)

        start_model = None
        if config.pipeline.sft.enabled:
            sft_overrides = {"training.stage": "sft", "training.ref_update": "none", "training.alpha": None,
                             "training.tau": None, **config.pipeline.sft.overrides}
            print("[trdpo] stage sft", flush=True)
            start_model = train(derive(config, sft_overrides, f"{config.name}-sft", None), {"trdpo.stage_name": "sft"})["model_dir"]

        trained: dict[tuple[str, int], dict] = {}
        for seed in seeds:
            for variant in variants:
                suffix = f"-s{seed}" if len(seeds) > 1 else ""
                print(f"[trdpo] stage train:{variant.name}{suffix}", flush=True)
                overrides = {**variant.overrides, "training.seed": seed, "training.export_steps": along_the_way}
                run_config = derive(config, overrides, f"{config.name}-{variant.name}{suffix}", start_model)
                trained[(variant.name, seed)] = train(run_config, {"trdpo.variant": variant.name, "trdpo.seed": str(seed)})

        comparisons = []
        if config.evaluation.enabled:
            comparisons = _evaluate(config, state, store, start_model, trained, seeds, along_the_way, parent.info.run_id)
        table = summary_table(config, trained, comparisons, client)
        report_uri = None
        if config.evaluation.enabled:
            report_uri = publish_report(client, parent.info.run_id, store)
        return {"parent_run_id": parent.info.run_id, "trained": trained, "comparisons": comparisons, "table": table,
                "report": report_uri}


def _initial_model(config: ExperimentConfig, store: Storage) -> str:
    """The untrained starting model as a model directory (the baseline when there is no SFT)."""
    if config.model.name_or_path:
        return config.model.name_or_path
    if not store.exists("initial", "config.json"):
        from trainers.model.build import build_policy, build_tokenizer

        tokenizer = build_tokenizer(config.model, config.tokenizer)
        with tempfile.TemporaryDirectory(prefix="trdpo-initial-") as tmp:
            build_policy(config.model, tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            store.put_dir(tmp, "initial")
    return store.uri_of("initial")


def _evaluate(config: ExperimentConfig, state: PipelineState, store: Storage, start_model: str | None,
              trained: dict[tuple[str, int], dict], seeds: list[int], along_the_way: list[int], parent_run_id: str) -> list[dict]:
    """Per seed: every policy (along the way and final) vs the starting model, with a sampled KL
    from it; every final policy vs vanilla DPO's. Samples of seed s use sampling.seed + s."""
    from evaluation.config import ModelRef
    from orchestrator.evaluate.driver import run_evaluation
    from orchestrator.evaluate.prompts import eval_prompts

    start = ModelRef(name="sft", path=start_model) if start_model else ModelRef(name="initial", path=_initial_model(config, store))
    prompts = eval_prompts(config.evaluation, config)
    dpo = config.pipeline.dpo_variant
    comparisons = []
    for seed in seeds:
        mine = {name: record for (name, s), record in trained.items() if s == seed}
        sampling = config.evaluation.sampling.model_copy(update={"seed": config.evaluation.sampling.seed + seed})
        suffix = f"-s{seed}" if len(seeds) > 1 else ""
        policies, tags = [], {}
        for name, record in mine.items():
            run_store = Storage(record["run_uri"])
            for step in along_the_way:
                label = f"{name}@{step}"
                if not run_store.exists(policy_at(step), "config.json"):
                    print(f"[trdpo] {name}{suffix}: no policy exported at step {step} (the run finished before "
                          f"evaluation.checkpoints asked for it; --restart retrains it)", flush=True)
                    continue
                policies.append(ModelRef(name=label, path=run_store.uri_of(policy_at(step))))
                tags[label] = {"trdpo.variant": name, "trdpo.seed": str(seed), "trdpo.step": str(step)}
            policies.append(ModelRef(name=name, path=run_store.uri_of(POLICY)))
            tags[name] = {"trdpo.variant": name, "trdpo.seed": str(seed), "trdpo.step": "final"}
        plans = [(f"vs-{start.name}{suffix}", start, policies, start.path)]
        if dpo in mine and len(mine) > 1:
            finals = [p for p in policies if p.name in mine and p.name != dpo]
            plans.append((f"vs-{dpo}{suffix}", ModelRef(name=dpo, path=Storage(mine[dpo]["run_uri"]).uri_of(POLICY)), finals, None))
        runs = {name: record["run_id"] for name, record in mine.items()}
        for plan_name, baseline, plan_policies, kl_reference in plans:
            stage = f"evaluate:{plan_name}"
            cfg = config.evaluation.model_copy(update={"policies": plan_policies, "baseline": baseline, "sampling": sampling})
            # The same evaluation settings on the same trained runs: nothing to redo.
            inputs = _digest({"evaluation": cfg.model_dump(mode="json"), "runs": runs, "kl": kl_reference})
            done = state.done(stage, inputs)
            if done:
                print(f"[trdpo] skipping stage {stage}: already done with these inputs (runs {done['run_id']})", flush=True)
                comparisons += done["comparisons"]
                continue
            print(f"[trdpo] stage {stage}", flush=True)
            summaries = run_evaluation(cfg, config.tracking, f"{config.name}-{plan_name}", prompts, parent_run_id=parent_run_id,
                                       tags={"trdpo.study": parent_run_id}, policy_tags=tags, kl_reference=kl_reference)
            rows = [{"policy": s.policy, "baseline": s.baseline, "run_id": s.run_id, "metrics": s.metrics, "seed": seed}
                    for s in summaries]
            state.record(stage, inputs, run_id=",".join(r["run_id"] for r in rows), comparisons=rows)
            comparisons += rows
    return comparisons
