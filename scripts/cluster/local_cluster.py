"""docker/compose.yaml's cluster as processes on this machine, without containers: PostgreSQL
(Debian's package, a temporary data directory), an S3-compatible server (moto), and the compose
file's own `mlflow`, `ray-head` and `ray-worker` commands, with one Ray token made for them. It
prints each command as it starts it (the recipe of docker/README.md, on one host), then what to
export in another shell to submit; Ctrl-C stops everything and deletes its files.

    .venv/bin/python scripts/cluster/local_cluster.py       # needs the dev extra and postgresql

It is the cluster of the end-to-end tier (tests/e2e), which submits a study, a sweep and a
training that loses a node to it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "e2e"))

from e2e_cluster import BUCKET, postgres_bin, running_cluster  # noqa: E402


def main() -> None:
    if postgres_bin() is None:
        sys.exit("error: PostgreSQL is not installed (apt-get install -y postgresql)")
    with running_cluster() as cluster:
        print(f"\n# the cluster is up; in another shell, from the repository root:\n"
              f"export RAY_AUTH_TOKEN_PATH={cluster.token_file} RAY_AUTH_MODE=token\n"
              f"export MLFLOW_TRACKING_URI={cluster.tracking_uri} TRDPO_OUTPUT_DIR=s3://{BUCKET}/runs\n"
              f"export AWS_ENDPOINT_URL={cluster.s3_endpoint} MLFLOW_S3_ENDPOINT_URL={cluster.s3_endpoint} "
              f"AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1\n"
              f".venv/bin/trdpo run --submit --address {cluster.dashboard}\n"
              f"# MLflow: {cluster.tracking_uri}   Ray dashboard: {cluster.dashboard}   Ctrl-C stops everything",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", flush=True)


if __name__ == "__main__":
    main()
