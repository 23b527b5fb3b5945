"""A study, from its runs to its report: ``data`` (the rows a report shows), ``collect`` (those
rows read back from MLflow), ``stats`` (curves, matched KL, summaries), ``figures`` (every
drawing, the sweep's included) and ``report`` (the self-contained HTML).

Nothing is imported here, so that building a report never pulls in MLflow (``collect`` does)."""
