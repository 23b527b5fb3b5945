"""The evaluation's parent-run artifacts: the summary table and the win-rate plots."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from evaluation.config import EvaluationConfig
from orchestrator.evaluate.comparison import ComparisonSummary


def log_summary(summaries: list[ComparisonSummary], cfg: EvaluationConfig, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.DataFrame([{"policy": s.policy, "baseline": s.baseline, **{k: v for k, v in s.metrics.items()}} for s in summaries])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        table.to_csv(out / "summary.csv", index=False)
        mlflow.log_artifact(str(out / "summary.csv"))
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(summaries), 3.5))
        rates = [s.metrics["eval/win_rate"] for s in summaries]
        errors = [[r - s.metrics["eval/win_rate_ci_low"] for r, s in zip(rates, summaries)],
                  [s.metrics["eval/win_rate_ci_high"] - r for r, s in zip(rates, summaries)]]
        ax.bar([s.policy for s in summaries], rates, yerr=errors, capsize=6, color="#4c72b0")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"win rate vs {cfg.baseline.name} (95% CI)")
        ax.set_title(f"judge: {cfg.judge.backend} / {cfg.judge.template}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "win_rates.png", dpi=120)
        plt.close(fig)
        mlflow.log_artifact(str(out / "win_rates.png"), artifact_path="plots")
        if cfg.criteria:
            fig, ax = plt.subplots(figsize=(2 + 1.4 * len(cfg.criteria), 3.5))
            width = 0.8 / len(summaries)
            for i, s in enumerate(summaries):
                ax.bar([c + i * width for c in range(len(cfg.criteria))],
                       [s.metrics.get(f"eval/{c}/win_rate", float("nan")) for c in cfg.criteria], width, label=s.policy)
            ax.set_xticks([c + width * (len(summaries) - 1) / 2 for c in range(len(cfg.criteria))], cfg.criteria, rotation=20)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"win rate vs {cfg.baseline.name}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "criteria.png", dpi=120)
            plt.close(fig)
            mlflow.log_artifact(str(out / "criteria.png"), artifact_path="plots")
