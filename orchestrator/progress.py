"""Progress lines with rate and ETA, and what rank 0 of a training does with each logged step.

Light to import on purpose: Ray Train workers unpickle the ``StepLogger`` they are handed, so its
module is imported by every worker; MLflow is imported only where a step is logged (rank 0),
not on workers that never log."""

from __future__ import annotations

import sys
import time


class StepProgress:
    def __init__(self, total_steps: int | None, label: str, stream=None, min_interval_s: float = 2.0):
        self.total, self.label, self.stream, self.min_interval = total_steps, label, stream, min_interval_s
        self.started = time.perf_counter()
        self.first_step: int | None = None
        self.last_print = 0.0

    def update(self, step: int, total: int | None = None, **values: float) -> None:
        self.total = total or self.total
        now = time.perf_counter()
        if self.first_step is None:  # rates count from the first report (a resumed run starts late)
            self.first_step, self.started = step, now
        done = self.total is not None and step >= self.total
        if now - self.last_print < self.min_interval and not done:
            return
        self.last_print = now
        elapsed = now - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {((self.total - step) / rate):.0f}s" if self.total and rate > 0 else ""
        pace = f" ({rate:.2f} steps/s{eta})" if step > self.first_step else ""  # no rate from one report
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        total = f"/{self.total}" if self.total else ""
        # sys.stdout as it is now (a default bound at import would outlive a replaced stream)
        print(f"[{self.label}] step {step}{total} {shown}{pace}", file=self.stream or sys.stdout, flush=True)


class StepLogger:
    """Logs one step's metrics to an MLflow run through the client API and prints progress.

    Picklable, so the driver hands it to the training workers, where rank 0 calls it: metrics go
    to MLflow without a ``ray.train.report`` round trip per step, and from one process only."""

    def __init__(self, tracking_uri: str, run_id: str, label: str):
        self.tracking_uri, self.run_id, self.label = tracking_uri, run_id, label
        self._progress = None
        self._client = None
        self._logged_up_to = 0

    def __getstate__(self) -> dict:  # the client and progress state stay in the process that made them
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "label": self.label, "_progress": None, "_client": None,
                "_logged_up_to": 0}

    def __call__(self, metrics: dict) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        step, timestamp = int(metrics["step"]), int(time.time() * 1000)
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
            # A resumed run repeats the steps after its last checkpoint: a metric history keeps
            # one value per step, the first one (a resume on the same workers repeats it exactly).
            logged = self._client.get_metric_history(self.run_id, "train/loss")
            self._logged_up_to = max((m.step for m in logged), default=0)
        if step > self._logged_up_to:
            entries = [Metric(k, float(v), timestamp, step) for k, v in metrics.items() if k != "step"]
            self._client.log_batch(self.run_id, metrics=entries)
        if self._progress is None:
            self._progress = StepProgress(None, self.label)
        extra = {"val_acc": metrics["val/rewards/accuracy"]} if "val/rewards/accuracy" in metrics else {}
        self._progress.update(step, total=round(step / metrics["train/progress"]), loss=metrics["train/loss"], **extra)
