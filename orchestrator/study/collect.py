"""A study read back from MLflow alone: everything the report shows, from the runs of one
experiment (``trdpo run``'s parent run) — so ``trdpo report RUN_ID`` rebuilds it anywhere the
tracking store is reachable, after the run directories are gone.

    parent run (trdpo.kind=experiment)
      training runs      tags trdpo.study, trdpo.variant, trdpo.seed   -> gradient norm, KL to initial
      comparison runs    tags trdpo.study, trdpo.variant, trdpo.seed, trdpo.step, trdpo.baseline
                         metrics eval/kl (sampled KL from the start), diversity/*, eval/*
                         artifact examples.json: one outcome per item (prompt#sample) and template

Win rates are paired by seed and prompt (``evaluation.paired``: a two-way bootstrap over seeds
and prompts, samples of a prompt averaged in its cell); TR-DPO vs DPO at matched KL interpolates
each variant's per-checkpoint grids at the same KL and takes the paired difference.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from pathlib import Path

from mlflow.tracking import MlflowClient

from evaluation.config import CRITERIA
from evaluation.metrics import Outcome, length_controlled
from evaluation.paired import ScoreGrid, interpolate_grids, paired_difference, paired_mean
from orchestrator.study.data import (CriterionRow, DiversityRow, FrontierPoint, History, MatchedKLRow, StudyData,
                                     VariantInfo, WinRateRow)

FINAL = "final"


def study_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`trdpo.study` = '{parent_run_id}'", max_results=10000)


def _examples(client: MlflowClient, run_id: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(client.download_artifacts(run_id, "examples.json", tmp))
        table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _outcome_records(rows: list[dict], template: str, seed) -> list[tuple]:
    column = f"{template}_outcome"
    return [(seed, row["item_id"].split("#")[0], row.get(column)) for row in rows if column in row]


def _lengths(rows: list[dict], template: str) -> list[Outcome]:
    """The judged outcomes with their lengths and prompts (the length-controlled CI draws prompts)."""
    column = f"{template}_outcome"
    return [Outcome(row[column], False, len(str(row["policy"]).split()), len(str(row["baseline"]).split()),
                    cluster=row["item_id"].split("#")[0])
            for row in rows if row.get(column)]


def collect_study(client: MlflowClient, parent_run_id: str, resamples: int = 2000) -> StudyData:
    parent = client.get_run(parent_run_id)
    runs = study_runs(client, parent_run_id)
    trainings = [r for r in runs if r.data.tags.get("trdpo.kind") == "train" and "trdpo.variant" in r.data.tags]
    comparisons = [r for r in runs if r.data.tags.get("trdpo.role") == "comparison" and "trdpo.variant" in r.data.tags]
    variants: dict[str, VariantInfo] = {}
    grad_norms, kl_histories = [], []
    for run in sorted(trainings, key=lambda r: (r.data.tags["trdpo.variant"], int(r.data.tags.get("trdpo.seed", 0)))):
        name, seed, params = run.data.tags["trdpo.variant"], int(run.data.tags.get("trdpo.seed", 0)), run.data.params
        alpha, tau = params.get("training.alpha"), params.get("training.tau")
        variants.setdefault(name, VariantInfo(name, params.get("training.ref_update", "none"),
                                              float(alpha) if alpha not in (None, "None") else None,
                                              int(tau) if tau not in (None, "None") else None))
        for key, target in (("train/grad_norm", grad_norms), ("val/kl_to_initial", kl_histories)):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            if history:
                target.append(History(name, seed, [m.step for m in history], [m.value for m in history]))

    baseline = parent.data.tags.get("trdpo.study_baseline", "sft")
    reference = parent.data.tags.get("trdpo.study_reference", "dpo")
    # (variant, baseline, step) -> {seed: rows}
    tables: dict[tuple, dict] = defaultdict(dict)
    kl: dict[tuple, list[float]] = defaultdict(list)  # (variant, step) -> per-seed sampled KL
    kl_by_seed: dict[tuple, float] = {}
    diversity: dict[str, list[dict]] = defaultdict(list)
    template = None
    for run in comparisons:
        tags, metrics = run.data.tags, run.data.metrics
        variant, seed, step = tags["trdpo.variant"], int(tags.get("trdpo.seed", 0)), tags.get("trdpo.step", FINAL)
        template = template or tags.get("trdpo.template")
        tables[(variant, tags["trdpo.baseline"], step)][seed] = _examples(client, run.info.run_id)
        if "eval/kl" in metrics:
            kl[(variant, step)].append(metrics["eval/kl"])
            kl_by_seed[(variant, step, seed)] = metrics["eval/kl"]
        if step == FINAL and tags["trdpo.baseline"] == baseline:
            diversity[variant].append(metrics)
    template = template or "hh"

    def grid(variant: str, against: str, step: str, which: str = template) -> ScoreGrid | None:
        per_seed = tables.get((variant, against, step))
        if not per_seed:
            return None
        return ScoreGrid.from_records([r for seed, rows in per_seed.items() for r in _outcome_records(rows, which, seed)])

    data = StudyData(title=f"TR-DPO study: {parent.info.run_name}", baseline=baseline, reference_variant=reference,
                     variants=list(variants.values()), grad_norms=grad_norms, kl_histories=kl_histories)
    seeds = sorted({int(r.data.tags.get("trdpo.seed", 0)) for r in trainings})
    data.summary = {"experiment run": parent_run_id, "seeds": ", ".join(map(str, seeds)) or "-",
                    "variants": ", ".join(variants) or "-", "judge template": template}

    for (variant, against, step), per_seed in sorted(tables.items(), key=lambda kv: (kv[0][1] != baseline, kv[0][0])):
        if step != FINAL:
            continue
        estimate = paired_mean(grid(variant, against, step), resamples=resamples)
        pooled = [o for rows in per_seed.values() for o in _lengths(rows, template)]
        lc = length_controlled(pooled, resamples=resamples) if pooled else None
        data.win_rates.append(WinRateRow(
            variant, against, estimate.mean, estimate.ci_low, estimate.ci_high, estimate.n_outcomes,
            lc.win_rate if lc else None, lc.ci_low if lc else None, lc.ci_high if lc else None, estimate.n_seeds))
        if against == baseline:
            for criterion in CRITERIA:
                g = grid(variant, against, step, criterion)
                if g is not None and not all(math.isnan(x) for x in g.scores.ravel()):
                    c = paired_mean(g, resamples=resamples)
                    data.criteria.append(CriterionRow(variant, criterion, c.mean, c.ci_low, c.ci_high, baseline))

    steps_of: dict[str, list] = defaultdict(list)
    for (variant, against, step) in tables:
        if against == baseline and (variant, step) in kl:
            steps_of[variant].append(step)
    curves: dict[str, tuple[list[float], list[ScoreGrid]]] = {}
    for variant, steps in steps_of.items():
        ordered = sorted(steps, key=lambda s: math.inf if s == FINAL else int(s))
        points = []
        for step in ordered:
            g = grid(variant, baseline, step)
            estimate = paired_mean(g, resamples=resamples)
            kls = kl[(variant, step)]
            mean_kl = sum(kls) / len(kls)
            kl_se = (sum((k - mean_kl) ** 2 for k in kls) / (len(kls) - 1)) ** 0.5 / len(kls) ** 0.5 if len(kls) > 1 else None
            number = _step_number(step, trainings, variant, grad_norms)
            data.frontier.append(FrontierPoint(variant, number, mean_kl, estimate.mean, estimate.ci_low, estimate.ci_high,
                                               None, kl_se))
            for seed, value in estimate_per_seed(g).items():
                data.frontier.append(FrontierPoint(variant, number, kl_by_seed.get((variant, step, seed), mean_kl), value,
                                                   seed=seed))
            points.append((mean_kl, g))
        points.sort(key=lambda p: p[0])
        curves[variant] = ([p[0] for p in points], [p[1] for p in points])
    data.matched_kl = _matched(curves, reference, resamples)

    for variant, rows in diversity.items():
        def mean(key: str) -> float | None:
            values = [m[key] for m in rows if key in m]
            return sum(values) / len(values) if values else None

        data.diversity.append(DiversityRow(variant, mean("diversity/policy/self_bleu"), mean("diversity/policy/distinct_1"),
                                           mean("diversity/policy/distinct_2"), mean("diversity/policy/mean_entropy")))
    if len(seeds) < 2:
        data.notes.append("One seed: the intervals cover prompts only, not training randomness (set pipeline.seeds).")
    return data


def estimate_per_seed(g: ScoreGrid) -> dict:
    import numpy as np

    return {seed: float(np.nanmean(row)) for seed, row in zip(g.seeds, g.scores) if not np.all(np.isnan(row))}


def _step_number(step: str, trainings: list, variant: str, histories: list[History]) -> int | None:
    """The optimizer step of a checkpoint; for the final policy, the variant's max_steps or else
    (a run trained by epochs) its last logged step; None when nothing tells (never a made-up 0,
    which would sort the final policy first on its curve)."""
    if step != FINAL:
        return int(step)
    steps = [int(r.data.params["training.max_steps"]) for r in trainings if r.data.tags.get("trdpo.variant") == variant
             and r.data.params.get("training.max_steps") not in (None, "None", "")]
    steps = steps or [h.steps[-1] for h in histories if h.variant == variant and h.steps]
    return max(steps) if steps else None


def _matched(curves: dict[str, tuple[list[float], list[ScoreGrid]]], reference: str, resamples: int) -> list[MatchedKLRow]:
    """Each variant against ``reference`` at the midpoint and the top of the KL range both cover,
    their per-(seed, prompt) grids interpolated to that KL, then paired."""
    if reference not in curves:
        return []
    ref_kls, ref_grids = curves[reference]
    rows = []
    for variant, (kls, grids) in curves.items():
        if variant == reference or not kls:
            continue
        low, high = max(min(kls), min(ref_kls)), min(max(kls), max(ref_kls))
        if high < low:
            continue
        for level in sorted({(low + high) / 2, high}):
            x, y = interpolate_grids(grids, kls, level), interpolate_grids(ref_grids, ref_kls, level)
            if x is None or y is None:
                continue
            a, b = paired_mean(x, resamples=resamples), paired_mean(y, resamples=resamples)
            d = paired_difference(x, y, resamples=resamples)
            rows.append(MatchedKLRow(variant, reference, level, a.mean, a.ci_low, a.ci_high, b.mean, b.ci_low, b.ci_high,
                                     d.mean, d.ci_low, d.ci_high))
    return rows
