"""The e2e tier's Debian packages: a missing one skips in one line naming it, or fails under
TRDPO_REQUIRE_E2E (CI installs them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import e2e_cluster  # noqa: E402
import browser  # noqa: E402


def test_a_missing_package_skips_in_one_line_naming_it(monkeypatch):
    monkeypatch.delenv("TRDPO_REQUIRE_E2E", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        browser.chromium()
    assert str(skipped.value) == "Chromium is not installed: apt-get install -y chromium"


def test_under_the_ci_variable_a_missing_package_fails(monkeypatch):
    monkeypatch.setenv("TRDPO_REQUIRE_E2E", "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        e2e_cluster.require("PostgreSQL", "postgresql", False)
    assert str(failed.value) == "PostgreSQL is not installed: apt-get install -y postgresql (TRDPO_REQUIRE_E2E is set)"
