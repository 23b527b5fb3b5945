from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError
from orchestrator.sweep.config import expand_variants, is_sweep_file, load_sweep

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted((REPO / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path):
    loaded = load_sweep(path)
    assert is_sweep_file(path) and len(loaded.points) >= 7
    text = path.read_text()
    assert text.startswith("#") and "trdpo sweep" in text  # says what it studies and how to run it


def test_paper_grids_cover_the_studied_values():
    loaded = load_sweep(REPO / "tune_configs" / "hh_pythia2.8b.yaml")
    points = [values for values, _ in loaded.points]
    soft = {(p["training.alpha"], p["training.tau"]) for p in points if p["training.ref_update"] == "soft"}
    hard = {p["training.tau"] for p in points if p["training.ref_update"] == "hard"}
    assert {a for a, _ in soft} == {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9} and {t for _, t in soft} >= {1}
    assert hard == {32, 64, 128, 256, 512, 1024}
    assert sum(p["training.ref_update"] == "none" for p in points) == 1
    assert loaded.base_tree["training"]["beta"] == 0.05


def write(tmp_path, **tree) -> Path:
    base = {"name": "t", "base": "default", "overrides": ["training.max_steps=40", "training.eval_every=10"],
            "search": {"variants": [{"training.ref_update": "hard", "training.alpha": None, "training.tau": {"grid": [2, 4]}}]},
            "scheduler": {"metric": "val/rewards/accuracy", "grace_period": 10, "max_t": 40}}
    for key, value in tree.items():
        base[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(base, allow_unicode=True))
    return path


def problems(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    return info.value.problems


def test_training_metric_is_refused_as_asha_metric(tmp_path):
    found = problems(write(tmp_path, scheduler={"metric": "train/loss", "max_t": 40}))
    assert any(p.startswith("scheduler.metric:") and "moving reference" in p for p in found), found


def test_judge_metric_is_refused_as_asha_metric_with_the_reason(tmp_path):
    # It is never reported while trials train: ASHA would stop nothing and the sweep would quietly be a grid.
    found = problems(write(tmp_path, scheduler={"metric": "eval/win_rate", "max_t": 40}))
    assert any(p.startswith("scheduler.metric:") and "never reported while a trial trains" in p for p in found), found
    unknown = problems(write(tmp_path, scheduler={"metric": "val/rewards/acc", "max_t": 40}))
    assert any("is not reported by the training loop" in p and "val/rewards/accuracy" in p for p in unknown), unknown


def test_every_report_to_asha_carries_the_metric(tmp_path):
    found = problems(write(tmp_path, overrides=["training.max_steps=40", "training.eval_every=10", "training.checkpoint_every=15"]))
    assert any("training.checkpoint_every: must be a multiple of eval_every=10" in p for p in found), found
    sft = problems(write(tmp_path, overrides=["training.max_steps=40", "training.eval_every=10", "training.stage=sft",
                                              "training.ref_update=none", "training.alpha=null", "training.tau=null"],
                         search={"space": {"training.learning_rate": {"grid": [1e-4, 1e-3]}}}))
    assert any("'val/rewards/accuracy' is not reported by the sft stage" in p for p in sft), sft


def test_soft_only_field_on_hard_trials_names_the_trial(tmp_path):
    flat = {"space": {"training.ref_update": {"grid": ["soft", "hard"]}, "training.alpha": 0.5, "training.tau": 4}}
    found = problems(write(tmp_path, search=flat))
    assert any(p.startswith("trial 1 (") and "ref_update=hard" in p and "): training.alpha: must not be set" in p for p in found), found
    assert not any(p.startswith("trial 0 ") for p in found)  # the soft trial is fine


def test_random_ranges_are_checked_at_both_ends(tmp_path):
    space = {"algorithm": "random", "variants": [{"training.ref_update": "soft", "training.tau": 2, "training.alpha": {"uniform": [0.5, 1.5]}}]}
    found = problems(write(tmp_path, search=space))
    assert any("alpha=1.5): training.alpha: must be ≤ 1.0" in p for p in found), found


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scheduler": {"metric": "val/loss", "grace_period": 50, "max_t": 40}}, "grace_period (50) exceeds scheduler.max_t (40)"),
        ({"search": {"space": {"training.alpha": {"normal": [0, 1]}}}}, "a search entry is a value or one of"),
        ({"search": {"space": {"training.learning_rate": {"loguniform": [1e-6, 1e-4]}}}}, "algorithm 'grid' takes only values"),
        ({"search": {"space": {"training.learning_rate": {"loguniform": [0, 1]}}}}, "'loguniform' needs low > 0"),
        ({"overrides": ["training.max_steps=40", "training.eval_every=null"]}, "base training.eval_every: must be set"),
        ({"base": "missing.yaml"}, "no such file"),
        ({"searchh": {}}, "searchh: Extra inputs are not permitted"),
    ],
)
def test_bad_sweep_files(tmp_path, change, message):
    found = problems(write(tmp_path, **change))
    assert any(message in p for p in found), found


def test_variants_expand_to_the_cartesian_product_per_variant():
    from orchestrator.sweep.config import SearchConfig

    search = SearchConfig(algorithm="random", space={"training.beta": 0.1}, variants=[
        {"training.ref_update": "none"},
        {"training.ref_update": "soft", "training.alpha": {"grid": [0.2, 0.4]}, "training.tau": {"grid": [1, 8]},
         "training.learning_rate": {"loguniform": [1e-6, 1e-4]}},
    ])
    points = expand_variants(search)
    assert len(points) == 1 + 4
    assert points[0] == ({"training.beta": 0.1, "training.ref_update": "none"}, {})
    assert points[1][1] == {"training.learning_rate": {"loguniform": [1e-6, 1e-4]}}
    assert {(p["training.alpha"], p["training.tau"]) for p, _ in points[1:]} == {(0.2, 1), (0.2, 8), (0.4, 1), (0.4, 8)}


def test_a_sweep_without_validation_data_is_refused_naming_the_fields(tmp_path):
    """Such trials report no val/ metric: before, a 0.0 val/loss would have ranked first under ASHA."""
    found = problems(write(tmp_path, overrides=["training.max_steps=40", "training.eval_every=10", "data.validation_fraction=0"],
                           scheduler={"metric": "val/loss", "mode": "min", "max_t": 40}))
    assert found == ["scheduler.metric: sweep metric val/loss needs validation data: data.validation_fraction is 0 "
                     "and no data.validation_path/validation_split is set"]
    # One trial without validation data is named alone.
    variants = [{"training.ref_update": "hard", "training.alpha": None, "training.tau": 4},
                {"training.ref_update": "hard", "training.alpha": None, "training.tau": 8, "data.validation_fraction": 0}]
    found = problems(write(tmp_path, search={"variants": variants}))
    assert found == ["trial 1 (validation_fraction=0, alpha=None, ref_update=hard, tau=8): sweep metric val/rewards/accuracy "
                     "needs validation data: data.validation_fraction is 0 and no data.validation_path/validation_split is set"]


def test_one_worker_trials_train_in_their_trial_process_unless_the_search_moves_workers(tmp_path):
    from orchestrator.config import validate_tree
    from orchestrator.sweep.config import trains_in_trial

    def decide(**tree) -> bool:
        loaded = load_sweep(write(tmp_path, **tree))
        return trains_in_trial(loaded, validate_tree(loaded.base_tree, loaded.path))

    assert decide()
    assert not decide(overrides=["training.max_steps=40", "training.eval_every=10", "training.num_workers=2"])
    searched_workers = {"variants": [{"training.ref_update": "hard", "training.alpha": None, "training.tau": 2,
                                      "training.num_workers": {"grid": [1, 2]}}]}
    assert not decide(search=searched_workers)
    searched_cpus = {"variants": [{"training.ref_update": "hard", "training.alpha": None, "training.tau": 2,
                                   "training.resources_per_worker.CPU": {"grid": [1, 2]}}]}
    assert not decide(search=searched_cpus)
    assert not decide(overrides=["training.max_steps=40", "training.eval_every=10", "training.shard_one_worker=true"])
