"""Periodic progress lines with rate and ETA (training reports arrive step by step)."""

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
