"""One trial: Tune's trainable, which drives one TorchTrainer (or, for a 1-worker trial, trains in
its own process) and logs to its own MLflow child run of the sweep's parent run (continued, not
duplicated, when a resumed trial starts again).

A 1-worker Ray Train run needs no process group and computes the same steps; what it adds is
seconds of start-up per trial (controller actor, worker process, imports: benchmarks/startup.py),
which every trial ASHA stops early pays in full. So a 1-worker trial holds the worker's resources
and trains itself, reporting straight to Tune, which hands the warm process on to the next trial;
trials of several workers keep the TorchTrainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.config import ExperimentConfig
from orchestrator.sweep.config import trial_config
from orchestrator.sweep.space import trial_values
from orchestrator.tracking import log_params
from trainers.state.storage import Storage

TRIAL_TAG = "trdpo.trial_id"
STATUS_TAG = "trdpo.trial_status"

if TYPE_CHECKING:
    from orchestrator.train import ResolvedRun
    from trainers.config import TrainSpec


def _child_run(client: MlflowClient, config: ExperimentConfig, parent_run_id: str, trial_id: str, values: dict) -> str:
    experiment = client.get_experiment_by_name(config.tracking.experiment_name)
    found = client.search_runs([experiment.experiment_id], f"tags.{TRIAL_TAG} = '{trial_id}' and tags.mlflow.parentRunId = '{parent_run_id}'")
    if found:  # a resumed trial continues its own child run
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=config.tracking.run_name,
                            tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id,
                                  "trdpo.ref_update": config.training.ref_update, "trdpo.stage": config.training.stage})
    log_params(config.flat_params(), run.info.run_id, client)
    client.log_dict(run.info.run_id, {"sweep_values": values}, "trial.json")
    return run.info.run_id


def run_trial(params: dict, *, base_tree: dict, points: list, sweep_name: str, parent_run_id: str, storage: str,
              in_trial: bool = False) -> None:
    """Tune's trainable: one TorchTrainer per trial, or with ``in_trial`` the loop in this process;
    the trial's storage (checkpoints, export) is ``<sweep storage>/trials/<trial id>``, so a
    restored trial finds its own checkpoints."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.ray_train import make_trainer
    from orchestrator.train import ResolvedRun

    trial_id = tune.get_context().get_trial_id()
    values = trial_values(points, params)
    config = trial_config(base_tree, values, f"{sweep_name}-{trial_id}")
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    run_id = _child_run(client, config, parent_run_id, trial_id, values)
    run = ResolvedRun.of(config, Storage(storage).child("trials", trial_id))
    spec = run.spec(run_id)
    if in_trial:
        _train_in_trial(run, spec)
    else:
        make_trainer(run, spec, callbacks=[TuneReportCallback()]).fit()
    client.set_tag(run_id, STATUS_TAG, "completed")
    client.set_terminated(run_id, "FINISHED")


def _train_in_trial(run: ResolvedRun, spec: TrainSpec) -> None:
    """The loop in the trial's own process, as a 1-worker Ray Train worker would run it: its
    reports go to Tune (ASHA decides on them; a stopped trial ends inside ``tune.report``), its
    checkpoints to the trial's storage, where a restarted or resumed trial finds them."""
    import torch

    from trainers.loop import train
    from trainers.sessions import LocalSession

    training = run.config.training
    torch.set_num_threads(max(1, int(training.resources_per_worker.CPU)))
    session = LocalSession(lambda metrics, saved: tune.report(metrics), run.checkpoints, keep=training.keep_checkpoints)
    try:
        train(spec, session)
    finally:  # Tune hands this process to the next trial: give back what this one's models held
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

