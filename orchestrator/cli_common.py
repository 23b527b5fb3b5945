"""What every ``trdpo`` command shares: the command group that turns user mistakes into one line,
the error it raises, the common options and loading an experiment file."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.config import ConfigError, load_experiment

SET_HELP = "Override a config field, e.g. --set training.alpha=0.6 (repeatable; values are YAML). See `trdpo fields`."


def _verbose(ctx, param, value: bool) -> None:
    if value:  # an environment variable, so that every process of the run sees it
        import os

        os.environ["TRDPO_VERBOSE"] = "1"


VERBOSE = click.option("--verbose", "-v", is_flag=True, expose_value=False, is_eager=True, callback=_verbose,
                       help="Show Ray's own messages on the console too (also TRDPO_VERBOSE=1); by default they go to the log file it names.")


class CleanErrors(click.Group):
    """Turn the errors a user can act on into one line and a non-zero exit, never a traceback:
    ``UserFacingError``s, also when Ray wrapped them (raised in a worker or actor). Anything else
    is a bug and keeps its traceback."""

    def invoke(self, ctx):
        from trainers.errors import user_facing_cause

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except KeyboardInterrupt as exc:
            # Runs were closed KILLED on the way out; everything resumes from its checkpoints.
            click.echo(str(exc) if str(exc) else "interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as exc:
            mistake = user_facing_cause(exc)
            if mistake is None:
                raise
            raise UserError(str(mistake)) from None


class UserError(click.ClickException):
    """One clear line, non-zero exit, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def load_or_fail(path: Path | None, overrides: tuple[str, ...]):
    try:
        return load_experiment(path, overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from None

