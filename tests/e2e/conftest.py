"""The end-to-end tier's cluster (e2e_cluster.py), one per module: the tier is one module, so
its tests share one cluster (~40 s to start on 2 cores). Where PostgreSQL or Chromium is missing
the tier is skipped, unless TRDPO_REQUIRE_E2E is set (CI sets it after installing them, .ci/run)."""

from __future__ import annotations

import pytest

from browser import chromium
from e2e_cluster import postgres_bin, require, running_cluster


@pytest.fixture(scope="module")
def cluster():
    # Both before anything starts: a missing browser found after the whole study ran costs minutes.
    require("PostgreSQL", "postgresql", postgres_bin() is not None)
    chromium()
    with running_cluster() as the:
        yield the
