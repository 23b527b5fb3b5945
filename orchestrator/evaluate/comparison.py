"""One comparison, policy vs baseline: judged with every template, its metrics, per-example table
and samples logged to its own MLflow child run."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from evaluation.config import EvaluationConfig, ModelRef
from evaluation.judges import JudgeUnavailable, describe_judge, is_pairwise
from evaluation.metrics import distinct_n, length_controlled, mean_entropy, mean_length, self_bleu, win_rate
from evaluation.pool import JudgePool
from evaluation.protocol import Item


@dataclass
class ComparisonSummary:
    policy: str
    baseline: str
    run_id: str
    metrics: dict[str, float]


def diversity_metrics(samples: list, prefix: str) -> dict[str, float]:
    texts = [s.response for s in samples]
    return {f"{prefix}self_bleu": self_bleu(texts), f"{prefix}distinct_1": distinct_n(texts, 1),
            f"{prefix}distinct_2": distinct_n(texts, 2), f"{prefix}mean_entropy": mean_entropy([[s.mean_entropy] for s in samples if s.mean_entropy is not None]),
            f"{prefix}mean_length_words": mean_length(texts)}

def compare(policy: ModelRef, cfg: EvaluationConfig, prompts, policy_samples, baseline_samples, templates, judges: JudgePool,
            client: MlflowClient, experiment_id: str, parent_run_id: str, out_dir: Path, extra_tags: dict | None = None,
            kl_metrics: dict | None = None) -> ComparisonSummary:
    label = f"{policy.name} vs {cfg.baseline.name}"
    tags = {"mlflow.parentRunId": parent_run_id, "trdpo.kind": "eval", "trdpo.role": "comparison", "trdpo.policy": policy.name,
            "trdpo.baseline": cfg.baseline.name, "trdpo.template": cfg.judge.template, **(extra_tags or {})}
    for role, ref in (("policy", policy), ("baseline", cfg.baseline)):
        if ref.mlflow_run_id:
            tags[f"trdpo.{role}_train_run"] = ref.mlflow_run_id
    run = client.create_run(experiment_id, run_name=label, tags=tags)
    items = [Item(f"{p.prompt_id}#{p.sample_index}", p.prompt, p.response, b.response)
             for p, b in zip(policy_samples, baseline_samples)]
    prompt_of = {item.item_id: p.prompt_id for item, p in zip(items, policy_samples)}
    metrics: dict[str, float] = dict(kl_metrics or {})
    per_item: dict[str, dict] = {item.item_id: {"prompt": item.prompt, "policy": item.policy, "baseline": item.baseline} for item in items}
    for template in templates:
        judge_cfg = cfg.judge.model_copy(update={"template": template})
        mode = "score" if template.endswith("_score") else "pairwise"
        results, calls = judges.judge(items, judge_cfg, both_orders=cfg.judge.both_orders and is_pairwise(cfg.judge),
                                      seed=cfg.sampling.seed, label=f"judge {label} [{template}]", mode=mode)
        # The prompt of each comparison: the CIs draw prompts, each with all of its samples.
        outcomes = [replace(r.to_outcome(), cluster=prompt_of[r.item_id]) for r in results]
        summary = win_rate(outcomes, resamples=cfg.bootstrap_resamples, seed=cfg.sampling.seed)
        prefix = "eval/" if template == cfg.judge.template else f"eval/{template.removesuffix('_score')}/"
        if summary.total and not summary.n:
            # Every call failed or said nothing parseable: a number here ("win rate nan") would
            # read as a finished evaluation. The judgments that did come back are cached.
            first_error = next((e for r in results for e in r.errors), "none recorded")
            failure = " ".join(
                f"{describe_judge(judge_cfg)}: no judgment succeeded for {label} [{template}] "
                f"({summary.api_errors} API errors, {summary.parse_failures} parse failures of {summary.total}; "
                f"first error: {first_error})".split())
            if template == cfg.judge.template:
                raise JudgeUnavailable(failure)
            # A criterion is a side result: its rates are absent (not 0), the counts say why.
            print(f"[eval] warning: {failure}; no {prefix}win_rate", file=sys.stderr, flush=True)
        if mode == "score":
            for role in ("policy", "baseline"):
                values = [getattr(r, f"{role}_score") for r in results if getattr(r, f"{role}_score") is not None]
                metrics[f"{prefix}{role}_score_mean"] = sum(values) / len(values) if values else float("nan")
        latencies = [r.latency_s for r in results if r.judge_calls and not r.cached]
        metrics.update({
            f"{prefix}judge_latency_s_mean": sum(latencies) / len(latencies) if latencies else float("nan"),
            f"{prefix}win_rate": summary.win_rate, f"{prefix}win_rate_se": summary.standard_error,
            f"{prefix}win_rate_ci_low": summary.ci_low, f"{prefix}win_rate_ci_high": summary.ci_high,
            f"{prefix}wins": summary.wins, f"{prefix}losses": summary.losses, f"{prefix}ties": summary.ties,
            f"{prefix}parse_failures": summary.parse_failures, f"{prefix}api_errors": summary.api_errors,
            f"{prefix}flip_rate": summary.flip_rate, f"{prefix}comparisons": summary.total,
            f"{prefix}judge_calls": calls, f"{prefix}cached_judgments": sum(r.cached for r in results),
            f"{prefix}judge_tokens": sum(r.usage_tokens for r in results),
        })
        if template == cfg.judge.template:
            # The minimal AlpacaEval 2 length model (no L1 penalty, instruction difficulty or
            # baseline regulariser: see evaluation.metrics.length_controlled), with a bootstrap CI.
            lc = length_controlled(outcomes, resamples=cfg.bootstrap_resamples, seed=cfg.sampling.seed)
            metrics.update(lc.as_metrics())
            if lc.separated:
                print(f"[eval] warning: {label}: wins separate (or nearly separate) by response length, so the "
                      f"length-controlled fit diverges; eval/lc_win_rate is not identified (CI [0, 1], eval/lc_separated = 1)",
                      file=sys.stderr, flush=True)
        for r in results:
            per_item[r.item_id].update({f"{template}_outcome": r.outcome, f"{template}_verdicts": json.dumps(r.verdicts),
                                        f"{template}_errors": "; ".join(r.errors),
                                        f"{template}_unparsed_answers": json.dumps(r.unparsed_answers)})
            if r.policy_score is not None:
                per_item[r.item_id].update(policy_score=r.policy_score, baseline_score=r.baseline_score)
    metrics.update(diversity_metrics(policy_samples, "diversity/policy/"))
    metrics.update(diversity_metrics(baseline_samples, "diversity/baseline/"))
    metrics["eval/avg_len_policy"] = mean_length(s.response for s in policy_samples)
    metrics["eval/avg_len_baseline"] = mean_length(s.response for s in baseline_samples)
    # A metric with no samples is NaN up to here: absent from now on (MLflow, the summary, the study).
    metrics = {k: float(v) for k, v in metrics.items() if v == v}
    client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        samples_path = Path(tmp) / "samples.jsonl"
        with samples_path.open("w", encoding="utf-8") as handle:
            for which, group in (("policy", policy_samples), ("baseline", baseline_samples)):
                for s in group:
                    handle.write(json.dumps({"model": which, **s.__dict__}) + "\n")
        client.log_artifact(run.info.run_id, str(samples_path))
    import pandas as pd

    client.log_table(run.info.run_id, pd.DataFrame([{"item_id": k, **v} for k, v in per_item.items()]), "examples.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"[eval] {label}: win rate {metrics['eval/win_rate']:.3f} "
          f"[{metrics['eval/win_rate_ci_low']:.3f}, {metrics['eval/win_rate_ci_high']:.3f}], "
          f"length-controlled {metrics['eval/lc_win_rate']:.3f} "
          f"[{metrics['eval/lc_win_rate_ci_low']:.3f}, {metrics['eval/lc_win_rate_ci_high']:.3f}], "
          f"ties {int(metrics['eval/ties'])}, parse failures {int(metrics['eval/parse_failures'])}, "
          f"API errors {int(metrics['eval/api_errors'])}", flush=True)
    return ComparisonSummary(policy.name, cfg.baseline.name, run.info.run_id, metrics)

