"""Where a training's first seconds go, before its first optimizer step: a printed breakdown.

    python benchmarks/startup.py            # imports (3 fresh interpreters each), 2 trainings on one Ray, the CLI
    python benchmarks/startup.py --quick    # `import ray` only, 1 interpreter each, 1 training, no CLI: checks the script

Three measurements, on the tiny demo model with 1 Ray Train worker (a smoke-sweep trial's shape):

1. **Imports**, each in a fresh interpreter (median of 3): what the driver, a Ray Train worker and a
   Tune trial import before doing anything.
2. **One training through the real lifecycle** (``orchestrator.ray_train.run_on_ray``) in this
   process, its parts timed by wrapping the functions it calls (nothing in the code under test
   changes): driver (config, preflight, ``ray.init``, MLflow run), Ray Train (controller,
   placement group, worker actor), the worker (process start and imports, tokenizer, data,
   model build, optimizer, first step). A second training on the same Ray shows what a later
   stage of a study, or a sweep's next trial, pays.
3. **The CLI as a user runs it**: ``trdpo train`` (Ray) and ``trdpo train --no-ray`` in fresh
   processes, time to the first progress line and to the end.

Printed: the breakdown in seconds, and ``start-up share`` = (start -> first step) / wall time of
the same 12-step training. Target (issue 18): a smoke-sweep trial's start -> first step <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2",
        "data.synthetic.num_pairs=160", "data.validation_fraction=0.1", "data.max_length=64",
        "training.per_device_batch_size=4", "training.max_steps=12", "training.tau=4", "training.eval_every=6",
        "training.checkpoint_every=6", "training.warmup_steps=0", "training.log_every=1"]

# What each process imports before its first line of work (measured in a fresh interpreter).
IMPORTS = {
    "torch": "import torch",
    "transformers (model classes)": "import transformers; from transformers import LlamaForCausalLM",
    "ray": "import ray",
    "ray.train.torch": "import ray.train.torch",
    "mlflow": "import mlflow",
    "driver: orchestrator.cli + ray_train": "import orchestrator.cli, orchestrator.ray_train",
    "worker: trainers.loop": "import trainers.loop",
    "Tune trial: orchestrator.sweep": "import orchestrator.sweep.trial",
}
QUICK_IMPORTS = ("ray",)  # the code path of every import line; the unpickling line imports trainers.loop anyway


def time_import(statement: str, repeats: int) -> float:
    """Median seconds of ``statement`` in a fresh interpreter (interpreter start not included)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def unpickling_the_spec(repeats: int) -> tuple[float, list[str]]:
    """What a Ray Train worker imports to receive its work: Ray Train, then the pickled
    ``{"spec": TrainSpec}`` (the loop, its config sections, the step logger); median seconds and
    which of mlflow / orchestrator.tracking it pulled in."""
    import pickle

    from orchestrator.config import load_experiment
    from orchestrator.train import ResolvedRun
    from trainers.state.storage import Storage

    config = load_experiment(None, TINY)
    blob = pickle.dumps({"spec": ResolvedRun.of(config, Storage("/tmp/unused")).spec(mlflow_run_id="0" * 32)})
    code = ("import pickle, sys, time; import ray.train.torch; t = time.perf_counter(); pickle.loads(sys.stdin.buffer.read()); "
            "print(time.perf_counter() - t, *[m for m in ('mlflow', 'orchestrator.tracking') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    times, pulled = [], []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, cwd=REPO, check=True)
        seconds, *pulled = done.stdout.decode().split()
        times.append(float(seconds))
    return statistics.median(times), pulled


def interpreter_start(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------ 2. one training, instrumented


def timed_worker(config: dict) -> None:
    """Ray Train's worker function for the benchmark: ``trainers.entrypoints.ray_train_worker`` with its
    parts timed (wall-clock marks written to ``<run storage>/startup_marks.json`` by rank 0).
    Defined in __main__, so Ray ships it by value."""
    import json as json_
    import time as time_

    entered = time_.time()
    import psutil
    import ray.train

    import trainers.entrypoints as entrypoints
    import trainers.loop as loop
    from trainers.state.storage import Storage

    marks: dict = {"entered": entered, "process_created": psutil.Process().create_time(), "loop_file": loop.__file__}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time_.time()
            out = fn(*args, **kwargs)
            marks[name] = [start, time_.time()]
            return out
        return wrapper

    for name in ("build_tokenizer", "load_pairs", "build_models", "make_optimizer"):
        setattr(loop, name, timed(name, getattr(loop, name)))
    spec = config["spec"]
    log_step = spec.step_logger

    def first_step_marker(metrics: dict) -> None:
        marks.setdefault("first_step", time_.time())  # called after each logged step's optimizer step
        if log_step is not None:
            log_step(metrics)

    spec.step_logger = first_step_marker
    entrypoints.ray_train_worker(config)
    marks["done"] = time_.time()
    if ray.train.get_context().get_world_rank() == 0:
        Storage(spec.run_uri).write_text(json_.dumps(marks), "startup_marks.json")


class Marks:
    """Wall-clock (start, end) of each wrapped driver-side call."""

    def __init__(self):
        self.spans: dict[str, list[float]] = {}

    def wrap(self, owner, name: str, label: str, context_manager: bool = False):
        import contextlib

        original = getattr(owner, name)
        spans = self.spans

        if context_manager:
            @contextlib.contextmanager
            def wrapper(*args, **kwargs):
                start = time.time()
                with original(*args, **kwargs) as value:
                    spans.setdefault(label, [start, time.time()])
                    yield value
        else:
            def wrapper(*args, **kwargs):
                start = time.time()
                try:
                    return original(*args, **kwargs)
                finally:
                    spans.setdefault(label, [start, time.time()])
        setattr(owner, name, wrapper)


def instrumented_trainings(root: Path, count: int) -> list[list[tuple[str, float]]]:
    """``count`` trainings through ``run_on_ray`` on one local Ray; each one's breakdown."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import orchestrator.ray_train as ray_train
    import orchestrator.train as train_module
    from orchestrator.config import load_experiment
    from trainers.state.storage import Storage

    ray_train.ray_train_worker = timed_worker  # make_trainer builds its TorchTrainer from this name
    breakdowns = []
    try:
        for index in range(count):
            marks = Marks()
            marks.wrap(train_module, "preflight", "preflight")
            marks.wrap(ray_train, "connect", "connect")
            marks.wrap(train_module, "tracked_run", "mlflow", context_manager=True)
            marks.wrap(ray_train, "off_main_thread", "fit")
            started = time.time()
            config = load_experiment(None, TINY + [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
                                                   f"tracking.output_dir={root}/runs", "tracking.experiment_name=bench",
                                                   f"tracking.run_name=startup-{index}"])
            loaded = time.time()
            result = ray_train.run_on_ray(config)
            ended = time.time()
            w = json.loads(Storage(result.run_uri).read_text("startup_marks.json"))
            assert Path(w["loop_file"]).is_relative_to(REPO), f"the worker ran {w['loop_file']}, not this checkout's code"
            d = marks.spans
            fit_start = d["fit"][0]
            created = min(max(w["process_created"], fit_start), w["entered"])
            parts = [
                ("driver: config", loaded - started),
                ("driver: preflight (model source, data read, storage)", d["preflight"][1] - d["preflight"][0]),
                ("driver: ray.init (local cluster)" if index == 0 else "driver: ray.init (already up)", d["connect"][1] - d["connect"][0]),
                ("driver: MLflow run (store, experiment, params, config)", d["mlflow"][1] - d["mlflow"][0]),
                ("driver: between (fingerprint, run record, spec)", fit_start - d["mlflow"][1]),
                ("Ray Train: controller, placement group, worker actor", created - fit_start),
                ("worker: process start, imports, unpickling, process group", w["entered"] - created),
                ("worker: tokenizer", _span(w, "build_tokenizer")),
                ("worker: data loading + tokenization", _span(w, "load_pairs")),
                ("worker: model build (policy, reference, initial)", _span(w, "build_models")),
                ("worker: optimizer", _span(w, "make_optimizer")),
                ("worker: first step (resume check, forward, backward, step)", w["first_step"] - w["make_optimizer"][1]),
            ]
            unaccounted = (w["first_step"] - started) - sum(seconds for _, seconds in parts)
            parts.append(("(not covered above)", unaccounted))
            parts.append(("= start -> first step", w["first_step"] - started))
            parts.append(("  rest of the 12 steps, export, MLflow close", ended - w["first_step"]))
            parts.append(("  wall time", ended - started))
            breakdowns.append(parts)
    finally:
        ray_train.disconnect()
    return breakdowns


def _span(marks: dict, name: str) -> float:
    start, end = marks[name]
    return end - start


# ------------------------------------------------------------------ 3. the CLI


def cli_times(root: Path, no_ray: bool) -> tuple[float, float]:
    """Seconds from starting ``trdpo train`` to its first progress line, and to its exit."""
    args = [sys.executable, "-m", "orchestrator.cli", "train", *(["--no-ray"] if no_ray else [])]
    for value in TINY + [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.output_dir={root}/runs",
                         "tracking.experiment_name=bench"]:
        args += ["--set", value]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, output = None, []
    for line in process.stdout:
        output.append(line)
        if first is None and re.search(r"\] step \d+/\d+ ", line):
            first = time.perf_counter() - start
    process.wait()
    total = time.perf_counter() - start
    if process.returncode != 0 or first is None:
        sys.exit(f"trdpo train{' --no-ray' if no_ray else ''} failed (exit {process.returncode}):\n{''.join(output)[-3000:]}")
    return first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="`import ray` only, 1 interpreter each, 1 training, no CLI runs.")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    if args.quick:
        print("QUICK (checks the script; numbers mean little): `import ray` only, 1 interpreter each, 1 training, no CLI",
              flush=True)

    print(f"imports, fresh interpreter, median of {repeats} (s):", flush=True)
    print(f"  {'interpreter start (python -c pass)':<58}{interpreter_start(repeats):7.2f}", flush=True)
    for label, statement in IMPORTS.items():
        if args.quick and label not in QUICK_IMPORTS:
            continue
        print(f"  {label:<58}{time_import(statement, repeats):7.2f}", flush=True)
    seconds, pulled = unpickling_the_spec(repeats)
    print(f"  {'worker: unpickling its spec, after ray.train.torch':<58}{seconds:7.2f}  (imports {', '.join(pulled) or 'no MLflow'})",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="trdpo-bench-startup-") as tmp:
        breakdowns = instrumented_trainings(Path(tmp), 1 if args.quick else 2)
    for index, parts in enumerate(breakdowns):
        title = "first training (starts Ray)" if index == 0 else "second training on the same Ray"
        print(f"{title}, tiny model, 1 Ray Train worker (s):", flush=True)
        for label, seconds in parts:
            print(f"  {label:<58}{seconds:7.2f}", flush=True)
    first = dict(breakdowns[0])
    print(f"start -> first step {first['= start -> first step']:.1f} s (target <= 10 s for a sweep trial); "
          f"start-up share {first['= start -> first step'] / first['  wall time']:.2f} of the 12-step run", flush=True)
    if len(breakdowns) > 1:
        again = dict(breakdowns[1])
        print(f"second training: start -> first step {again['= start -> first step']:.1f} s; "
              f"second/first {again['= start -> first step'] / first['= start -> first step']:.2f}x", flush=True)

    if not args.quick:
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-startup-cli-") as tmp:
            for side in ("ray", "local"):
                (Path(tmp) / side).mkdir()
            ray_first, ray_total = cli_times(Path(tmp) / "ray", no_ray=False)
            local_first, local_total = cli_times(Path(tmp) / "local", no_ray=True)
        print(f"CLI trdpo train: first step after {ray_first:.1f} s, exit after {ray_total:.1f} s; "
              f"--no-ray: first step after {local_first:.1f} s, exit after {local_total:.1f} s; "
              f"Ray/no-Ray time to first step {ray_first / local_first:.2f}x", flush=True)


if __name__ == "__main__":
    main()
