"""Orchestration: the experiment schema, the CLI, Ray Train/Tune drivers and MLflow tracking."""
