"""``trdpo sweep``: α/τ studies on Ray Tune with ASHA early stopping (Ray Train V2 pattern).

    driver ── MLflow parent run ── Tuner(trial function, grid over the sweep's points, ASHA on step)
      trial function (tiny CPU share) ── MLflow child run ── TorchTrainer(ray_train_worker).fit()
          rank 0 logs every step to the child run; reports (validation steps) reach Tune/ASHA
          through TuneReportCallback
      1-worker trials: the trial function holds the worker's resources and trains itself
          (orchestrator.sweep.trial); Tune reuses its process for the next trial

ASHA's time axis is the optimizer ``step`` each report carries; it ranks trials on a validation
metric measured against each trial's fixed *initial* reference (or a judge metric), which is
comparable across α and τ. A trial that ASHA stops never runs code after its last report, so the
driver closes every child run itself from Tune's view of the trials.

    trdpo sweep tune_configs/smoke.yaml            # then, after Ctrl-C or a crash:
    trdpo sweep tune_configs/smoke.yaml --resume
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator import console
from orchestrator.config import validate_tree
from orchestrator.ray_train import check_resources, connect
from orchestrator.sweep.config import load_sweep, trains_in_trial, trial_config
from orchestrator.sweep.ledger import TrialLedger
from orchestrator.sweep.space import param_space
from orchestrator.sweep.summary import TrialRow, best_row, plots, results_table, summarize
from orchestrator.sweep.trial import run_trial
from orchestrator.tracking import configure, find_run, tracked_run
from trainers.errors import UserFacingError
from trainers.state.storage import Storage


class NothingToResume(UserFacingError, FileNotFoundError):
    """``--resume`` of a sweep that left no state in its storage."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended (Ctrl-C); ``--resume`` finishes it."""



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
    in_trial = trains_in_trial(loaded, base)
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
                                 parent_run_id=parent.info.run_id, storage=store.uri, in_trial=in_trial),
            # In the trial, the trial function is the worker and holds its resources; otherwise it
            # only drives its TorchTrainer, whose workers hold them.
            {"cpu": t.resources_per_worker.CPU, "gpu": t.resources_per_worker.GPU} if in_trial else {"cpu": 0.01},
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
                    reduction_factor=sweep.scheduler.reduction_factor,
                    # A trial that reaches max_t ends by itself, after exporting its policy: stopped
                    # by ASHA at its last report, it would end inside that report, before the export.
                    stop_last_trials=False)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(loaded),
                # The metric goes to Tune only for ASHA, whose reports all carry it (validated): Tune
                # then checks every report strictly. Without a scheduler the ranking is ours.
                tune_config=tune.TuneConfig(metric=sweep.scheduler.metric if scheduler else None,
                                            mode=sweep.scheduler.mode if scheduler else None, scheduler=scheduler,
                                            num_samples=sweep.search.num_samples, max_concurrent_trials=concurrency,
                                            # one process for trial after trial: imports and caches stay warm
                                            reuse_actors=in_trial),
                run_config=tune.RunConfig(name=sweep.name, storage_path=tune_path, storage_filesystem=tune_fs,
                                          verbose=1 if console.verbose() else 0,  # Tune's tables: --verbose
                                          callbacks=[ledger],
                                          # In the trial, a lost trial process is a lost worker: the
                                          # restarted trial resumes from its newest checkpoint.
                                          failure_config=tune.FailureConfig(max_failures=t.max_failures if in_trial else 0)),
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
            raise SweepInterrupted(f"sweep {sweep.name} interrupted; finish it with: {console.as_typed('trdpo')} sweep {path} --resume")
        return rows, parent.info.run_id
