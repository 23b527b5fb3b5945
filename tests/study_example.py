"""Made-up but realistic study data of every kind, for the report tests and for previews:

    python tests/study_example.py /tmp/study     # writes /tmp/study/report.html

Not a result: the numbers are drawn from a seeded generator shaped like a TR-DPO study."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from evaluation.config import CRITERIA
from orchestrator.study.data import (CriterionRow, DiversityRow, FrontierPoint, History, StudyData, SweepRow, VariantInfo,
                                     WinRateRow)
from orchestrator.study.report import build_report


def example_study(seed: int = 0) -> StudyData:
    """Made-up but realistic data of every kind (DPO, TR-DPO soft and hard, 3 seeds, 4 checkpoints,
    a small sweep): for previews and the report tests. Not a result."""
    import numpy as np

    rng = np.random.default_rng(seed)
    variants = [VariantInfo("dpo", "none"), VariantInfo("trdpo-soft", "soft", 0.6, 8), VariantInfo("trdpo-hard", "hard", None, 32)]
    drift = {"dpo": 1.0, "trdpo-soft": 1.5, "trdpo-hard": 1.3}  # TR-DPO drifts further per step
    steps = [0, 20, 40, 60, 80]
    frontier, grad, kls, rates = [], [], [], []
    for v in variants:
        for seed_ in range(3):
            kl_steps = [drift[v.name] * 0.03 * s * (1 + 0.1 * rng.standard_normal()) for s in steps]
            kls.append(History(v.name, seed_, steps, [max(0.0, k / 20) for k in kl_steps]))
            gn = 2.0 + rng.gamma(2.0, 0.5, size=len(range(0, 81, 4)))
            if v.ref_update != "none":  # spikes after reference updates
                gn[:: max(1, (v.tau or 8) // 4)] *= 1.0 + 0.5 * drift[v.name]
            grad.append(History(v.name, seed_, list(range(0, 81, 4)), [float(x) for x in gn]))
            for s, k in zip(steps[1:], kl_steps[1:]):
                # Quality rises with KL, then falls: over-optimisation past KL ~2.
                w = 0.5 + 0.12 * k - 0.025 * k**2 + 0.02 * rng.standard_normal()
                frontier.append(FrontierPoint(v.name, s, float(k), float(w), seed=seed_))
        for s in steps[1:]:
            pts = [p for p in frontier if p.variant == v.name and p.step == s and p.seed is not None]
            k, w = np.mean([p.kl for p in pts]), np.mean([p.win_rate for p in pts])
            frontier.append(FrontierPoint(v.name, s, float(k), float(w), float(w - 0.06), float(w + 0.06), kl_se=0.05))
        final = [p for p in frontier if p.variant == v.name and p.step == steps[-1] and p.seed is None][0]
        rates.append(WinRateRow(v.name, "sft", final.win_rate, final.ci_low, final.ci_high, 600, final.win_rate - 0.02,
                                final.ci_low - 0.02, final.ci_high - 0.02, seeds=3))
    for v in variants[1:]:
        d = float(rng.normal(0.02, 0.02))
        rates.append(WinRateRow(v.name, "dpo", 0.5 + d, 0.44 + d, 0.56 + d, 600, 0.5 + d / 2, seeds=3))
    criteria = [CriterionRow(v.name, c, float(0.5 + rng.normal(0.06, 0.04)), None, None) for v in variants for c in CRITERIA]
    criteria = [CriterionRow(r.variant, r.criterion, r.win_rate, r.win_rate - 0.07, r.win_rate + 0.07) for r in criteria]
    diversity = [DiversityRow(v.name, float(rng.uniform(20, 40)), float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.5, 0.7)),
                              float(rng.uniform(1.5, 2.5))) for v in variants]
    sweep = [SweepRow("soft", a, t, float(0.55 + 0.1 * a - 0.02 * math.log2(t) + 0.01 * rng.standard_normal()))
             for a in (0.3, 0.5, 0.7) for t in (1, 4, 16, 64)]
    sweep += [SweepRow("hard", None, t, float(0.5 + 0.015 * math.log2(t) + 0.01 * rng.standard_normal())) for t in (16, 64, 256, 512)]
    sweep += [SweepRow("none", None, None, 0.56)]
    return StudyData(
        title="TR-DPO study (example data)", summary={"task": "synthetic (proxy labels)", "seeds": "0, 1, 2", "steps": "80"},
        variants=variants, win_rates=rates, criteria=criteria, frontier=frontier, grad_norms=grad, kl_histories=kls,
        diversity=diversity, sweep=sweep, sweep_metric="eval/win_rate", notes=["Example data, not a result."],
    )


if __name__ == "__main__":
    print(build_report(example_study(), Path(sys.argv[1])))
