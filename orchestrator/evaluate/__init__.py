"""``trdpo eval``, a thin driver over ``evaluation/``: ``file`` (the eval file's schema and
loading), ``prompts`` (what is sampled on), ``preflight`` (models and judge checked before anything
is spent), ``driver`` (:func:`~orchestrator.evaluate.driver.run_evaluation`: samples on the
generation pool, judgments on the judge pool, the MLflow parent run), ``comparison`` (one policy
vs the baseline: metrics and child run) and ``summary`` (the parent run's table and plots)."""
