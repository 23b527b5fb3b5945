"""``trdpo sweep``: α/τ studies on Ray Tune with ASHA early stopping (Ray Train V2 pattern).

    driver ── MLflow parent run ── Tuner(trial function, grid over the sweep's points, ASHA on step)
      trial function (tiny CPU share) ── MLflow child run ── TorchTrainer(ray_train_worker).fit()
          rank 0 logs every step to the child run; reports (validation steps) reach Tune/ASHA
          through TuneReportCallback

ASHA's time axis is the optimizer ``step`` each report carries; it ranks trials on a validation
metric measured against each trial's fixed *initial* reference (or a judge metric), which is
comparable across α and τ. A trial that ASHA stops never runs code after its last report, so the
driver closes every child run itself from Tune's view of the trials.

    trdpo sweep tune_configs/smoke.yaml            # then, after Ctrl-C or a crash:
    trdpo sweep tune_configs/smoke.yaml --resume
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator import console
from orchestrator.config import ExperimentConfig, validate_tree
from orchestrator.ray_train import check_resources, connect
from orchestrator.sweep_config import LoadedSweep, load_sweep, trial_config
from orchestrator.tracking import configure, find_run, tracked_run
from trainers.errors import UserFacingError
from trainers.storage import Storage

TRIAL_TAG = "trdpo.trial_id"
STATUS_TAG = "trdpo.trial_status"


class NothingToResume(UserFacingError, FileNotFoundError):
    """``--resume`` of a sweep that left no state in its storage."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended (Ctrl-C); ``--resume`` finishes it."""


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    status: str
    steps: int
    last: float | None
    best: float | None
    error: str | None
    mlflow_run_id: str | None


def _tune_distribution(spec: dict):
    kind, arg = next(iter(spec.items()))
    return {"choice": lambda: tune.choice(arg), "uniform": lambda: tune.uniform(*arg),
            "loguniform": lambda: tune.loguniform(*arg), "randint": lambda: tune.randint(*arg)}[kind]()


def param_space(loaded: LoadedSweep) -> dict:
    space: dict[str, Any] = {"point": tune.grid_search(list(range(len(loaded.points))))}
    for index, (_, randoms) in enumerate(loaded.points):
        for key, dist in randoms.items():
            space[f"p{index}:{key}"] = _tune_distribution(dist)
    return space


def trial_values(loaded_points: list, params: dict) -> dict[str, Any]:
    index = params["point"]
    fixed, randoms = loaded_points[index]
    return {**fixed, **{key: params[f"p{index}:{key}"] for key in randoms}}


def _child_run(client: MlflowClient, config: ExperimentConfig, parent_run_id: str, trial_id: str, values: dict) -> str:
    experiment = client.get_experiment_by_name(config.tracking.experiment_name)
    found = client.search_runs([experiment.experiment_id], f"tags.{TRIAL_TAG} = '{trial_id}' and tags.mlflow.parentRunId = '{parent_run_id}'")
    if found:  # a resumed trial continues its own child run
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=config.tracking.run_name,
                            tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id,
                                  "trdpo.ref_update": config.training.ref_update, "trdpo.stage": config.training.stage})
    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in config.flat_params().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.log_dict(run.info.run_id, {"sweep_values": values}, "trial.json")
    return run.info.run_id


def run_trial(params: dict, *, base_tree: dict, points: list, sweep_name: str, parent_run_id: str, storage: str) -> None:
    """Tune's trainable: one TorchTrainer per trial; the trial's storage (checkpoints, export) is
    ``<sweep storage>/trials/<trial id>``, so a restored trial finds its own checkpoints."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.ray_train import make_trainer
    from orchestrator.train import spec_of

    trial_id = tune.get_context().get_trial_id()
    values = trial_values(points, params)
    config = trial_config(base_tree, values, f"{sweep_name}-{trial_id}")
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    run_id = _child_run(client, config, parent_run_id, trial_id, values)
    spec = spec_of(config, Storage(storage).uri_of("trials", trial_id), run_id)
    make_trainer(config, spec, callbacks=[TuneReportCallback()]).fit()
    client.set_tag(run_id, STATUS_TAG, "completed")
    client.set_terminated(run_id, "FINISHED")


class TrialLedger(tune.Callback):
    """How each trial ended, from Tune's public callbacks, kept in the sweep's storage so that a
    ``--resume`` still knows the trials that ended before it.

    A result marked ``done`` is the end of a trial (its last step, or an ASHA stop), an error is an
    error; a trial that started and got neither was cut short by an interrupt."""

    FILE = "trials.json"

    def __init__(self, store: Storage):
        self.store = store
        self.trials: dict[str, dict] = {}

    def setup(self, **info) -> None:
        self.trials = json.loads(self.store.read_text(self.FILE)) if self.store.exists(self.FILE) else {}

    def _save(self) -> None:
        self.store.write_text(json.dumps(self.trials, indent=1), self.FILE)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        new = [t for t in trials if t.trial_id not in self.trials]
        for trial in new:  # every trial, started or not, with its sampled parameters
            self.trials[trial.trial_id] = {"config": trial.config, "state": "pending", "step": 0}
        if new:
            self._save()

    def _mark(self, trial, state: str, step: int | None = None, error: str | None = None) -> None:
        record = self.trials.setdefault(trial.trial_id, {"config": trial.config, "step": 0})
        record["state"] = state
        if step is not None:
            record["step"] = int(step)
        if error:
            record["error"] = error
        self._save()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, "running")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._mark(trial, "ended" if result.get("done") else "running", result.get("step"))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, "ended", (trial.last_result or {}).get("step"))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, "errored", (trial.last_result or {}).get("step"), error=f"trial {trial.trial_id} failed")


def _metric_stats(result, metric: str, mode: str) -> tuple[float | None, float | None]:
    frame = result.metrics_dataframe if result is not None else None
    if frame is None or metric not in frame:
        return None, None
    values = frame[metric].dropna()
    if values.empty:
        return None, None
    return float(values.iloc[-1]), float(values.max() if mode == "max" else values.min())


def summarize(results, ledger: TrialLedger, loaded: LoadedSweep, client: MlflowClient, parent_run_id: str) -> list[TrialRow]:
    """One row per trial, and every child run closed with its final status."""
    metric, mode = loaded.sweep.scheduler.metric, loaded.sweep.scheduler.mode
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = {r.data.tags.get(TRIAL_TAG): r.info.run_id
                for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")}
    by_trial = {r.metrics.get("trial_id"): r for r in results if r.metrics}
    rows = []
    for trial_id, record in ledger.trials.items():
        result = by_trial.get(trial_id)
        values = trial_values(loaded.points, record["config"])
        max_steps = trial_config(loaded.base_tree, values, "x").training.max_steps
        steps = record.get("step", 0)
        last, best = _metric_stats(result, metric, mode)
        error = None
        if result is not None and result.error is not None:
            error = str(result.error).strip().splitlines()[-1][:500]
        if record["state"] == "errored":
            status, mlflow_status = "errored", "FAILED"
            error = error or record.get("error")
        elif record["state"] != "ended":
            status, mlflow_status = "interrupted", "KILLED"
        elif max_steps is not None and steps < max_steps:
            status, mlflow_status = f"stopped early at step {steps}", "FINISHED"
        else:
            status, mlflow_status = "completed", "FINISHED"
        run_id = children.get(trial_id)
        if run_id:
            client.set_tag(run_id, STATUS_TAG, status)
            if error:
                client.set_tag(run_id, "trdpo.error", error)
            client.set_terminated(run_id, mlflow_status)
        rows.append(TrialRow(trial_id, values, status, steps, last, best, error, run_id))
    return rows


def results_table(rows: list[TrialRow], metric: str) -> pd.DataFrame:
    records = []
    for row in rows:
        records.append({"trial_id": row.trial_id, **{k: v for k, v in row.values.items()}, "status": row.status,
                        "steps": row.steps, f"last {metric}": row.last, f"best {metric}": row.best,
                        "error": row.error or "", "mlflow_run_id": row.mlflow_run_id})
    return pd.DataFrame.from_records(records)


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None and r.status != "errored"]
    if not scored:
        return None
    # Rank by the metric at the end of each trial's run: a trial ASHA stopped early is not a winner.
    finished = [r for r in scored if r.status == "completed"] or scored
    return (max if mode == "max" else min)(finished, key=lambda r: r.last if r.last is not None else r.best)


def plots(rows: list[TrialRow], loaded: LoadedSweep, out_dir: Path) -> list[Path]:
    """The metric at each trial's last step over α × τ (soft trials) and over τ (hard trials),
    drawn by the study report's own figures: cells and points average a setting's trials (seeds)
    and the colour map follows the sweep's mode."""
    from orchestrator.study.data import SweepRow
    from orchestrator.study.figures import figure_sweep_heatmap, figure_sweep_tau
    from orchestrator.study.stats import sweep_grid

    metric, mode = loaded.sweep.scheduler.metric, loaded.sweep.scheduler.mode
    points = []
    for row in rows:
        if row.last is None:
            continue
        # The trial's whole config, not only the sampled values: α or τ may be fixed in the base file.
        training = trial_config(loaded.base_tree, row.values, "x").training
        points.append(SweepRow(training.ref_update, training.alpha, training.tau, row.last))
    written = []
    alphas, taus, _ = sweep_grid(points)
    if alphas and taus:
        written.append((out_dir / "heatmap_alpha_tau.png", figure_sweep_heatmap(points, metric, mode)))
    if any(p.ref_update == "hard" and p.tau is not None for p in points):
        written.append((out_dir / "curve_hard_tau.png", figure_sweep_tau(points, metric)))
    for path, figure in written:
        figure.savefig(path)
    return [path for path, _ in written]


def run_sweep(path: str | Path, resume: bool = False, address: str | None = None) -> tuple[list[TrialRow], str]:
    loaded = load_sweep(path)
    sweep = loaded.sweep
    base = validate_tree(loaded.base_tree, loaded.path)
    # Trials run in their own directories: pin tracking and outputs to absolute locations.
    loaded.base_tree.setdefault("tracking", {}).update(
        tracking_uri=base.tracking.resolved_tracking_uri(), output_dir=Storage(base.tracking.output_dir).uri)
    Storage(base.tracking.output_dir).check_writable()
    connect(address)
    check_resources(base)
    t = base.training
    cpus_per_trial = t.num_workers * t.resources_per_worker.CPU
    concurrency = sweep.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_trial))
    store = Storage(base.tracking.output_dir).child("sweeps", sweep.name)
    tune_fs, tune_path = store.child("tune").pyarrow()
    experiment_path = f"{tune_path}/{sweep.name}"
    configure(base)
    previous = find_run(base, sweep.name) if resume else None
    if resume and not tune.Tuner.can_restore(experiment_path, storage_filesystem=tune_fs):
        raise NothingToResume(f"--resume: no sweep state under {store.uri_of('tune', sweep.name)}; run without --resume first")
    if not resume:
        store.remove(TrialLedger.FILE)
    ledger = TrialLedger(store)

    with tracked_run(base, sweep.name, tags={"trdpo.kind": "sweep", "trdpo.sweep_file": str(path)},
                     run_id=previous.info.run_id if previous else None) as parent:
        if previous is None:
            mlflow.log_artifact(str(path), artifact_path="sweep")
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base_tree=loaded.base_tree, points=loaded.points, sweep_name=sweep.name,
                                 parent_run_id=parent.info.run_id, storage=store.uri),
            {"cpu": 0.01},  # the trial function only drives its TorchTrainer; workers hold the CPUs
        )
        if resume:
            print(f"[trdpo] resuming sweep {sweep.name} from {store.uri_of('tune', sweep.name)}", flush=True)
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=tune_fs)
        else:
            scheduler = None
            if sweep.scheduler.type == "asha":
                scheduler = tune.schedulers.ASHAScheduler(
                    time_attr="step", max_t=sweep.scheduler.max_t, grace_period=sweep.scheduler.grace_period,
                    reduction_factor=sweep.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(loaded),
                # The metric goes to Tune only for ASHA, whose reports all carry it (validated): Tune
                # then checks every report strictly. Without a scheduler the ranking is ours.
                tune_config=tune.TuneConfig(metric=sweep.scheduler.metric if scheduler else None,
                                            mode=sweep.scheduler.mode if scheduler else None, scheduler=scheduler,
                                            num_samples=sweep.search.num_samples, max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=sweep.name, storage_path=tune_path, storage_filesystem=tune_fs,
                                          verbose=1 if console.verbose() else 0,  # Tune's tables: --verbose
                                          callbacks=[ledger]),
            )
        print(f"[trdpo] sweep {sweep.name}: {len(loaded.points) * sweep.search.num_samples} trials, "
              f"{concurrency} at a time, ASHA on {sweep.scheduler.metric} ({sweep.scheduler.mode})", flush=True)
        results = tuner.fit()
        ledger.setup()  # the callback that ran may be a restored copy: read what it recorded
        client = MlflowClient(base.tracking.resolved_tracking_uri())
        rows = summarize(results, ledger, loaded, client, parent.info.run_id)
        table = results_table(rows, sweep.scheduler.metric)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            table.to_csv(out / "results.csv", index=False)
            for plot in plots(rows, loaded, out):
                mlflow.log_artifact(str(plot), artifact_path="plots")
            mlflow.log_artifact(str(out / "results.csv"))
            winner = best_row(rows, sweep.scheduler.mode)
            if winner is not None:
                best = trial_config(loaded.base_tree, winner.values, f"{sweep.name}-best")
                (out / "best_config.yaml").write_text(
                    f"# Best trial {winner.trial_id} of sweep {sweep.name}: {sweep.scheduler.metric} = {winner.last}\n"
                    + best.to_yaml(), encoding="utf-8")
                mlflow.log_artifact(str(out / "best_config.yaml"))
                mlflow.set_tags({"trdpo.best_trial": winner.trial_id, "trdpo.best_values": str(winner.values)})
                if winner.last is not None:
                    mlflow.log_metric(f"best/{sweep.scheduler.metric}", winner.last)
        print(table.drop(columns=["mlflow_run_id", "error"]).to_string(index=False), flush=True)
        if any(r.status == "interrupted" for r in rows):
            raise SweepInterrupted(f"sweep {sweep.name} interrupted; finish it with: trdpo sweep {path} --resume")
        return rows, parent.info.run_id
