"""``trdpo submit|status|logs|stop``: experiments and sweeps as Ray jobs on a cluster (through
the Ray Jobs API, :mod:`orchestrator.submit`), and the ``--submit`` of ``run`` and ``sweep``."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli_common import SET_HELP, UserError, load_or_fail
from orchestrator.console import as_typed


def set_args(overrides: tuple[str, ...]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def shipped(path: Path) -> str:
    from orchestrator.submit import SubmitError, relative_to_working_dir

    try:
        return relative_to_working_dir(path)
    except SubmitError as exc:
        raise UserError(str(exc)) from None


def submit_as_job(args: list[str], address: str | None, tracking) -> None:
    """Submit ``trdpo ARGS`` as a job; ``tracking`` is the section whose store and outputs must
    survive the job (refused in one line when they would not)."""
    from orchestrator.submit import SubmitError, check_durable, submit

    if not address:
        raise UserError("--submit needs --address http://HEAD:8265 (the Ray dashboard / Jobs API)")
    try:
        check_durable(tracking.tracking_uri, tracking.output_dir if "output_dir" in tracking.model_fields_set else None)
        job_id = submit(args, address)
    except SubmitError as exc:
        raise UserError(str(exc)) from None
    click.echo(job_id)
    click.echo(f"follow: {as_typed('trdpo')} logs {job_id} --address {address}", err=True)


JOB_ADDRESS = click.option("--address", required=True, help="Ray Jobs API address, e.g. http://HEAD:8265.")


@click.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@JOB_ADDRESS
def submit(file: Path | None, overrides: tuple[str, ...], address: str) -> None:
    """Submit `trdpo run FILE` to a Ray cluster as a job (ships this directory); prints the job id."""
    config = load_or_fail(file, overrides)  # fail here, not on the cluster
    submit_as_job(["run", *([shipped(file)] if file else []), *set_args(overrides)], address, config.tracking)


@click.command()
@click.argument("job_id")
@JOB_ADDRESS
def status(job_id: str, address: str) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from orchestrator import submit as jobs

    click.echo(jobs.status(job_id, address))


@click.command()
@click.argument("job_id")
@JOB_ADDRESS
def logs(job_id: str, address: str) -> None:
    """Print a submitted job's output so far."""
    from orchestrator import submit as jobs

    click.echo(jobs.logs(job_id, address), nl=False)


@click.command()
@click.argument("job_id")
@JOB_ADDRESS
def stop(job_id: str, address: str) -> None:
    """Stop a submitted job."""
    from orchestrator import submit as jobs

    stopped = jobs.stop(job_id, address)
    click.echo(f"{job_id}: {'stop requested' if stopped else 'was not running'}")



JOB_COMMANDS = (submit, status, logs, stop)
