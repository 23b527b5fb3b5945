"""The search space Tune sees: a grid over the sweep file's points, each with its own random
draws, and the mapping back from Tune's parameters to one trial's dotted config values."""

from __future__ import annotations

from typing import Any

from ray import tune

from orchestrator.sweep.config import LoadedSweep


def _tune_distribution(spec: dict):
    kind, arg = next(iter(spec.items()))
    return {"choice": lambda: tune.choice(arg), "uniform": lambda: tune.uniform(*arg),
            "loguniform": lambda: tune.loguniform(*arg), "randint": lambda: tune.randint(*arg)}[kind]()


def param_space(loaded: LoadedSweep) -> dict:
    space: dict[str, Any] = {"point": tune.grid_search(list(range(len(loaded.points))))}
    for index, (_, randoms) in enumerate(loaded.points):
        for key, dist in randoms.items():
            space[f"p{index}:{key}"] = _tune_distribution(dist)
    return space


def trial_values(loaded_points: list, params: dict) -> dict[str, Any]:
    index = params["point"]
    fixed, randoms = loaded_points[index]
    return {**fixed, **{key: params[f"p{index}:{key}"] for key in randoms}}

