"""``trdpo sweep``: α/τ studies on Ray Tune with ASHA. ``config`` (the sweep file), ``space``
(what Tune samples), ``trial`` (one trial's trainable and MLflow child run), ``ledger`` (how each
trial ended, kept for ``--resume``), ``summary`` (rows, table, best trial, figures) and
``driver`` (:func:`~orchestrator.sweep.driver.run_sweep`).

Nothing is imported here: a Tune trial imports only ``trial`` and what it needs."""
