"""MLflow stores for tests: a real SQLite tracking store that starts as a copy of an empty one.

Creating an MLflow SQLite store runs all of MLflow's schema migrations, 2-3 s on this machine's
cores, and most tests that train make a store of their own. The migrations run once a session,
into a template; each test's store starts as a byte copy of it (MLflow opens it as any store it
made, in milliseconds). Tests of what happens when trdpo itself creates a store (its console,
its logging) name a path that does not exist yet instead.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.cache
def _empty_store() -> Path:
    from mlflow.tracking import MlflowClient

    directory = tempfile.mkdtemp(prefix="trdpo-test-mlflow-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = Path(directory) / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables, runs the migrations
    return path


def sqlite_store(path: str | Path) -> str:
    """The ``sqlite:///`` URI of an MLflow store at ``path``: an empty one copied there unless a
    file is there already (a module's tests sharing one store keep its runs)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), path)
    return f"sqlite:///{path}"
