"""A study, from its runs to its report: ``data`` (the rows a report shows), ``collect`` (those
rows read back from MLflow), ``stats`` (curves, matched KL, summaries), ``figures`` (every
drawing, the sweep's included), ``report`` (the self-contained HTML) and ``publish`` (the
summary table and the report, logged to the study's parent run and written beside its outputs).

Nothing is imported here, so that building a report never pulls in MLflow (``collect`` does)."""
