"""``trdpo``: validate, inspect and run TR-DPO experiments.

    trdpo train                                  # the embedded offline demo
    trdpo train exp.yaml --set training.alpha=0.6
    trdpo validate exp.yaml other.yaml           # one line per problem, exit 1 if any
    trdpo fields training                        # every config field with its help text
    trdpo export exp.yaml --checkpoint 40 --role reference --out ref-40
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.cli_common import SET_HELP, VERBOSE, CleanErrors, UserError, load_or_fail
from orchestrator.cli_jobs import JOB_COMMANDS, set_args, shipped, submit_as_job
from orchestrator.config import ConfigError, TrackingConfig, field_help, load_experiment
from orchestrator.console import as_typed


@click.group(cls=CleanErrors, context_settings={"help_option_names": ["-h", "--help"]})
@VERBOSE
def main() -> None:
    """Trust Region DPO experiments on Ray: training, sweeps, evaluation, MLflow tracking."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def validate(files: tuple[Path, ...], overrides: tuple[str, ...]) -> None:
    """Check experiment files; print one line per problem naming the field."""
    from orchestrator.evaluate.file import is_eval_file, load_eval_file
    from orchestrator.sweep.config import is_sweep_file, load_sweep

    failed = False
    for path in files:
        try:
            if is_eval_file(path):
                evaluation = load_eval_file(path)[0].evaluation
                click.echo(f"{path}: ok (evaluation: {len(evaluation.policies)} policies vs {evaluation.baseline.name}, "
                           f"judge {evaluation.judge.backend})")
                continue
            if is_sweep_file(path):
                loaded = load_sweep(path)
                click.echo(f"{path}: ok (sweep '{loaded.sweep.name}', {len(loaded.points)} grid points x "
                           f"{loaded.sweep.search.num_samples}, {loaded.sweep.scheduler.type} on {loaded.sweep.scheduler.metric})")
                continue
            config = load_experiment(path, overrides)
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:
                click.echo(f"{path}: {problem}", err=True)
            continue
        t = config.training
        click.echo(f"{path}: ok ({t.stage}, ref_update={t.ref_update}, beta={t.beta}, alpha={t.alpha}, tau={t.tau})")
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("prefix", required=False, default="")
def fields(prefix: str) -> None:
    """List config fields (optionally under PREFIX, e.g. 'training') with type, default and help."""
    rows = [r for r in field_help() if r.path.startswith(prefix)]
    if not rows:
        raise UserError(f"no config field starts with {prefix!r}")
    for row in rows:
        click.echo(f"{row.path}  ({row.type}, default: {row.default!r})\n    {row.description}")


ADDRESS_HELP = "Ray cluster to join (e.g. 'auto' or ray://head:10001); default: start a local Ray for this run."
RESTART_HELP = "Delete what an earlier run of the same name left (checkpoints, export) and train it over."


@main.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--no-ray", is_flag=True, help="Run the loop in this process (one worker, no FSDP): quickest for debugging.")
@click.option("--restart", is_flag=True, help=RESTART_HELP)
@VERBOSE
def train(file: Path | None, overrides: tuple[str, ...], address: str | None, no_ray: bool, restart: bool) -> None:
    """Train one policy with Ray Train + FSDP (FILE, or the embedded offline demo) and log it to MLflow.

    Re-running the same command continues the run from its newest complete checkpoint; a run that
    finished is not trained again; a rerun whose settings changed is refused (naming the fields)."""
    config = load_or_fail(file, overrides)
    if no_ray:
        from orchestrator.train import run_local

        result = run_local(config, restart=restart)
    else:
        from orchestrator.ray_train import run_on_ray

        result = run_on_ray(config, address=address, restart=restart)
    metrics = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("val/")}
    validation = f"final validation {metrics}" if metrics else "no validation metrics (the run had no validation data)"
    click.echo(f"done: run {result.run_name} ({result.run_id}); {validation}")
    click.echo(f"policy: {result.model_dir}")
    click.echo(f"browse: {as_typed('mlflow')} ui --backend-store-uri {config.tracking.resolved_tracking_uri()}")


@main.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--gpu-memory", default=None, metavar="SIZE", help="Memory per accelerator, e.g. 80GiB: say whether the run fits.")
@click.option("--worst-case", is_flag=True, help="Plan every micro-batch at its largest possible size instead of "
              "reading the local data's lengths.")
def plan(file: Path | None, overrides: tuple[str, ...], gpu_memory: str | None, worst_case: bool) -> None:
    """Per-worker memory of FILE's training before launch: parameters, gradients, AdamW state,
    reference, initial model, activations; from the model's config.json alone (no weights;
    the Pythia suite is known offline). Exit 1 when it does not fit --gpu-memory."""
    from trainers.model.memory import data_shape, describe, fits, parse_bytes, plan_memory, plan_skeleton, suggestions
    from trainers.model.build import build_tokenizer

    config = load_or_fail(file, overrides)
    try:
        accelerator = parse_bytes(gpu_memory) if gpu_memory else None
    except ValueError as exc:
        raise UserError(f"--gpu-memory {exc}") from None
    skeleton = plan_skeleton(config.model, lambda: build_tokenizer(config.model, config.tokenizer))
    # bf16 as training would pick it on the accelerator being planned for.
    bf16 = config.training.precision == "bf16" or (config.training.precision == "auto" and accelerator is not None)
    shape, why = None, "--worst-case"
    if not worst_case:  # the micro-batches this data really makes, when the data and tokenizer are local
        shape, why = data_shape(config.model, config.tokenizer, config.data, config.training)
    if shape is None:
        click.echo(f"(micro-batch planned at its largest: {why})")
    result = plan_memory(skeleton, config.data, config.training, bf16, shape, config.model.lora)
    click.echo(describe(result, config.model, accelerator))
    if accelerator and not fits(result, accelerator):
        for line in suggestions(skeleton, config.data, config.training, bf16, accelerator, shape=shape, lora=config.model.lora):
            click.echo(f"  to fit: {line}")
        sys.exit(1)


@main.command(name="export")
@click.argument("run")
@click.option("--checkpoint", "which", default="latest", show_default=True, metavar="STEP|latest",
              help="The checkpoint's step (a wrong one lists the steps there are).")
@click.option("--role", type=click.Choice(["policy", "reference"]), default="policy", show_default=True,
              help="Which model of the checkpoint to export.")
@click.option("--out", "out", required=True, metavar="DIR|URI",
              help="Destination: a local directory or a store URI (s3://…); LoRA runs also get OUT/adapter.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def export_(run: str, which: str, role: str, out: str, overwrite: bool, overrides: tuple[str, ...]) -> None:
    """Export the policy or reference of any checkpoint of RUN (an experiment file, or the run's
    storage directory/URI) as a merged Hugging Face model that AutoModelForCausalLM.from_pretrained
    loads, with its tokenizer. For LoRA runs OUT/adapter also holds the role's PEFT adapter
    (PeftModel.from_pretrained(base, OUT/adapter)). One process, CPU, no Ray; any world size."""
    from orchestrator.export import export_source
    from trainers.loop import CHECKPOINTS
    from trainers.state.checkpoint_export import export_checkpoint
    from trainers.state.storage import Storage

    try:
        source, store = export_source(run, overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    result = export_checkpoint(source, store.child(CHECKPOINTS), which, role, Storage(out), overwrite=overwrite,
                               log=click.echo)
    click.echo(f"done: the {role} of step {result.step} ({result.checkpoint})")
    click.echo(f"model: {result.model_dir}")
    if result.adapter_dir:
        click.echo(f"adapter: {result.adapter_dir}")


@main.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--no-ray", is_flag=True, help="Train in this process (evaluation still uses a local Ray actor pool).")
@click.option("--submit", "submit_job", is_flag=True, help="Submit as a Ray job to --address (http://HEAD:8265) and print its id.")
@click.option("--restart", is_flag=True, help=RESTART_HELP)
@VERBOSE
def run(file: Path | None, overrides: tuple[str, ...], address: str | None, no_ray: bool, submit_job: bool, restart: bool) -> None:
    """Run a whole experiment (FILE, or the embedded offline demo): [sft] -> train variants ->
    generate -> judge -> report. Re-running skips the stages already done."""
    from orchestrator.pipeline import run_pipeline

    config = load_or_fail(file, overrides)
    if submit_job:
        submit_as_job(["run", *([shipped(file)] if file else []), *set_args(overrides)], address, config.tracking)
        return
    result = run_pipeline(config, address=address, use_ray=not no_ray, restart=restart)
    from orchestrator.ray_train import disconnect

    disconnect()  # Ray relays workers' last log lines at shutdown: let them come before ours
    uri = config.tracking.resolved_tracking_uri()
    click.echo(f"done: experiment run {result['parent_run_id']}")
    click.echo(f"browse: {as_typed('trdpo')} ui --set tracking.tracking_uri={uri}  (or: {as_typed('mlflow')} ui --backend-store-uri {uri})")
    if result["report"]:
        click.echo(f"report: {result['report']}")


@main.command()
@click.argument("run_id")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Directory for report.html and its PNGs (default: ./report-RUN_ID).")
def report(run_id: str, overrides: tuple[str, ...], out: Path | None) -> None:
    """Rebuild the HTML study report of experiment run RUN_ID from MLflow alone (the tracking store
    of the configuration; --set tracking.tracking_uri=... for another)."""
    from mlflow.exceptions import MlflowException

    from orchestrator.study.publish import write_report
    from orchestrator.tracking import configure_tracking

    config = load_or_fail(None, overrides)
    client = __import__("mlflow").tracking.MlflowClient(configure_tracking(config.tracking))
    try:
        html = write_report(client, run_id, out or Path(f"report-{run_id}"))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"run {run_id}: not found in {config.tracking.resolved_tracking_uri()} ({str(exc).splitlines()[0]})") from None
    click.echo(f"report: {html.resolve()}")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Finish an interrupted sweep: completed trials are kept, unfinished ones continue from their checkpoints.")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--submit", "submit_job", is_flag=True, help="Submit as a Ray job to --address (http://HEAD:8265) and print its id.")
@VERBOSE
def sweep(file: Path, resume: bool, address: str | None, submit_job: bool) -> None:
    """Run an alpha/tau search from a tune_configs/ FILE on Ray Tune with ASHA early stopping."""
    from orchestrator.sweep.driver import SweepInterrupted, run_sweep
    from orchestrator.sweep.config import load_sweep

    try:
        loaded = load_sweep(file)
        if submit_job:
            submit_as_job(["sweep", shipped(file), *(["--resume"] if resume else [])], address,
                    TrackingConfig.model_validate(loaded.base_tree.get("tracking", {})))
            return
        rows, run_id = run_sweep(file, resume=resume, address=address)
    except SweepInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)
    click.echo(f"done: sweep run {run_id}; {sum(r.status == 'completed' for r in rows)} completed, "
               f"{sum(r.status.startswith('stopped') for r in rows)} stopped early, {sum(r.status == 'errored' for r in rows)} errored")


@main.command(name="eval")
@click.argument("file", type=click.Path(path_type=Path))
@VERBOSE
def eval_(file: Path) -> None:
    """Sample from the policies and baseline in FILE, judge them, and log win rates to MLflow."""
    from orchestrator.evaluate.driver import run_evaluation
    from orchestrator.evaluate.file import load_eval_file
    from orchestrator.evaluate.prompts import eval_prompts

    config, experiment = load_eval_file(file)
    prompts = eval_prompts(config.evaluation, experiment)
    summaries = run_evaluation(config.evaluation, config.tracking, config.name, prompts)
    for s in summaries:
        m = s.metrics
        click.echo(f"{s.policy} vs {s.baseline}: win rate {m['eval/win_rate']:.3f} "
                   f"[{m['eval/win_rate_ci_low']:.3f}, {m['eval/win_rate_ci_high']:.3f}] (run {s.run_id})")


for command in JOB_COMMANDS:
    main.add_command(command)


@main.command()
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--port", default=5000, show_default=True, help="Port of the local MLflow UI.")
@click.option("--print-only", is_flag=True, help="Print the command instead of starting the UI.")
def ui(overrides: tuple[str, ...], port: int, print_only: bool) -> None:
    """Open the MLflow UI on the configured tracking store (or say where a remote server is)."""
    import subprocess

    config = load_or_fail(None, overrides)
    uri = config.tracking.resolved_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        click.echo(f"tracking server: open {uri} in a browser (experiment '{config.tracking.experiment_name}')")
        return
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    click.echo(f"MLflow UI on http://127.0.0.1:{port} (store {uri}); Ctrl-C to stop")
    if print_only:
        click.echo(" ".join(command))
        return
    subprocess.run(command, check=False)


if __name__ == "__main__":
    main()
