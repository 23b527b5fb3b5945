"""The private Ray APIs of orchestrator.compat exist in the installed Ray and behave as relied on
(no cluster is started: the relay printer is called directly)."""

from __future__ import annotations

import ray


def test_node_ip_address_is_an_address():
    from ray.util import get_node_ip_address as node_ip_address  # public since Ray 2.x: no longer in compat

    assert node_ip_address().count(".") == 3


def test_the_relay_printer_is_where_ray_init_binds_it_and_can_be_routed(monkeypatch, capsys):
    import inspect

    from ray._private import worker

    from orchestrator.compat import relayed_output_routed, route_relayed_output

    assert ray.__version__.startswith("2."), ray.__version__
    # ray.init binds worker.print_to_stdstream when it connects, and the error-message thread calls it.
    assert "print_to_stdstream" in inspect.getsource(worker.connect)
    assert "print_to_stdstream" in inspect.getsource(worker.listen_error_messages)
    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored after the test
    seen = []
    route_relayed_output(lambda batch, show: (seen.append(batch["lines"]), show(batch)))
    route_relayed_output(lambda batch, show: (seen.append(["second route"] + batch["lines"]), show(batch)))
    assert relayed_output_routed()
    worker.print_to_stdstream({"lines": ["hello from a worker"], "pid": 4242, "is_err": False, "ip": "x", "localhost": "x"},
                              ignore_prefix=False)
    assert seen == [["second route", "hello from a worker"]]  # replaced, not stacked
    printed = capsys.readouterr().out
    assert "pid=4242" in printed and "hello from a worker" in printed  # Ray's own printer, reached through the route


def test_ray_train_reads_the_environment_variables_trdpo_sets():
    from ray.train.v2._internal import constants

    from orchestrator.compat import RAY_TRAIN_ENV

    for constant, (name, _) in RAY_TRAIN_ENV.items():
        assert getattr(constants, constant, None) == name, f"Ray Train no longer reads {name} ({constant})"


def test_ray_train_takes_over_sigint_only_on_the_main_thread_and_fit_runs_off_it():
    import inspect
    import threading

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from orchestrator.compat import off_main_thread

    source = inspect.getsource(DataParallelTrainer)
    assert "signal.signal(signal.SIGINT" in source, "Ray Train no longer installs a SIGINT handler: off_main_thread may go"
    assert "threading.current_thread() is threading.main_thread()" in source, \
        "Ray Train's SIGINT handler no longer depends on the thread: off_main_thread does not keep Ctrl-C ours"
    assert off_main_thread(lambda: threading.current_thread() is threading.main_thread()) is False
    try:
        off_main_thread(lambda: 1 / 0)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("an error in fn must reach the caller")


def test_ray_train_builds_its_controller_where_the_failure_policy_can_be_replaced():
    """orchestrator.ray_trainer.DPOTrainer swaps the controller's failure policy (a user's mistake is
    not retried) in ``_initialize_and_run_controller``, which Ray Train calls with keyword arguments."""
    import inspect

    from ray.train.v2._internal.execution.controller.controller import TrainController
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "failure_policy=" in inspect.getsource(DataParallelTrainer.fit), \
        "Ray Train no longer passes failure_policy to _initialize_and_run_controller: DPOTrainer retries user mistakes"
    assert "failure_policy" in inspect.signature(TrainController.__init__).parameters
    assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(
        DataParallelTrainer._initialize_and_run_controller).parameters.values())


def test_dpo_trainer_starts_no_ray_data_actor_when_it_passes_no_dataset(monkeypatch):
    """DPOTrainer drops Ray Train's DatasetsCallback (a DatasetManager actor per attempt) when no
    Ray Dataset is passed; the workers' train context takes no shard provider then."""
    import inspect

    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from orchestrator.ray_trainer import DPOTrainer

    assert "callbacks=self._create_default_callbacks()" in inspect.getsource(DataParallelTrainer.fit)
    assert inspect.signature(RayTrainWorker.init_train_context).parameters["dataset_shard_provider"].default is None
    seen = {}
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.datasets, trainer.run_config = {}, type("RunConfig", (), {"failure_config": None})()
    other = object()
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", lambda self, **kwargs: seen.update(kwargs))
    trainer._initialize_and_run_controller(callbacks=[DatasetsCallback.__new__(DatasetsCallback), other])
    assert seen["callbacks"] == [other]
    trainer.datasets = {"train": object()}
    kept = DatasetsCallback.__new__(DatasetsCallback)
    trainer._initialize_and_run_controller(callbacks=[kept, other])
    assert seen["callbacks"] == [kept, other]
