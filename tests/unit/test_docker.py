"""The compose file and Dockerfile agree with the CLI (no Docker engine here, so we check the text)."""

from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_compose_defines_the_cluster_and_shares_storage():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    assert "8265:8265" in services["ray-head"]["ports"] and "5000:5000" in services["mlflow"]["ports"]
    assert "--dashboard-host 0.0.0.0" in services["ray-head"]["command"]
    assert "ray-head:6379" in services["ray-worker"]["command"]
    assert "postgresql://" in services["mlflow"]["command"] and "--allowed-hosts" in services["mlflow"]["command"]
    for name in ("ray-head", "ray-worker"):
        service = services[name]
        assert "runs:/runs" in service["volumes"] and service["environment"]["TRDPO_OUTPUT_DIR"] == "/runs"
        assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert set(compose["volumes"]) >= {"runs", "pgdata", "mlartifacts"}


def test_dockerfile_installs_torch_first_and_the_package():
    text = (DOCKER / "Dockerfile").read_text()
    assert text.index("torch==") < text.index("pip install -e .")
    assert "ARG TORCH_INDEX" in text and "ARG BASE_IMAGE" in text
    for package in ("orchestrator", "trainers", "evaluation", "tune_configs"):
        assert f"COPY {package} ./{package}" in text


def test_output_dir_follows_the_environment(monkeypatch):
    from orchestrator.config import TrackingConfig

    monkeypatch.setenv("TRDPO_OUTPUT_DIR", "/runs")
    assert TrackingConfig().output_dir == "/runs"
    monkeypatch.delenv("TRDPO_OUTPUT_DIR")
    assert TrackingConfig().output_dir == "trdpo_runs"
