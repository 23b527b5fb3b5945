from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import ConfigError, apply_override, default_config_path, field_help, load_experiment, set_values, validate_tree

REPO = Path(__file__).resolve().parents[3]


def base_tree() -> dict:
    return yaml.safe_load(default_config_path().read_text())


def problems_of(tree: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_tree(tree, "test.yaml")
    return info.value.problems


def with_(**changes) -> dict:
    tree = base_tree()
    set_values(tree, {dotted.replace("__", "."): value for dotted, value in changes.items()})
    return tree


def without(*paths: str) -> dict:
    tree = base_tree()
    for path in paths:
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node.pop(leaf)
    return tree


BAD_CONFIGS = [
    (with_(training__alpha=1.5), "training.alpha: must be ≤ 1.0, got 1.5"),
    (with_(training__alpha=-0.1), "training.alpha: must be ≥ 0.0, got -0.1"),
    (with_(training__tau=0), "training.tau: must be ≥ 1, got 0"),
    (with_(training__alpha=None), "training.alpha: required when ref_update is 'soft'"),
    (with_(training__tau=None), "training.tau: required when ref_update is 'soft'"),
    (with_(training__ref_update="hard"), "training.alpha: must not be set when ref_update is 'hard'"),
    (with_(training__ref_update="hard", training__alpha=None, training__tau=None), "training.tau: required when ref_update is 'hard'"),
    (with_(training__ref_update="none"), "training.alpha: must not be set when ref_update is 'none'"),
    (with_(training__ref_update="none", training__alpha=None), "training.tau: must not be set when ref_update is 'none'"),
    (with_(training__ref_update="trust"), "training.ref_update: must be one of 'none', 'soft' or 'hard', got 'trust'"),
    (with_(training__beta=0), "training.beta: must be > 0.0, got 0"),
    (with_(training__beta=-1), "training.beta: must be > 0.0, got -1"),
    (with_(data__max_prompt_length=96), "data.max_prompt_length: must be < max_length=96"),
    (with_(data__max_length=0), "data.max_length: must be > 0, got 0"),
    (with_(training__alfa=0.6), "training.alfa: unknown key (did you mean 'alpha'?)"),
    (with_(training__num_epochs=1), "training.max_steps: set exactly one of 'max_steps' and 'num_epochs'"),
    (with_(training__tau=10000), "training.tau: is larger than max_steps=120"),
    (with_(training__loss="ipo", training__label_smoothing=0.1), "training.label_smoothing: applies to the sigmoid (DPO) loss only"),
    (with_(training__stage="sft"), "training.ref_update: the sft stage has no reference model"),
    (with_(model__name_or_path="gpt2"), "model.name_or_path: set exactly one of 'name_or_path' and 'tiny'"),
    (with_(model__tiny__num_heads=5), "model.tiny.num_heads: must divide hidden_size=64, got 5"),
    (with_(data__format="hh_rlhf"), "data.path: format 'hh_rlhf' needs exactly one of 'path' and 'hf_dataset'"),
    (with_(data__format="preference", data__path="train.txt"), "data.path: unsupported file type '.txt'"),
    (with_(data__on_bad_row="ignore"), "data.on_bad_row: must be one of 'error' or 'skip', got 'ignore'"),
    (with_(training__per_device_batch_size="many"), "training.per_device_batch_size: input should be a valid integer"),
    (without("training"), "training: required, but missing"),
    (with_(evaluation__judge={"backend": "openai"}), "evaluation.judge.model: the openai judge needs a model"),
    (with_(evaluation__judge={"backend": "openai", "model": "gpt-4", "api_key": "sk-secret"}),
     "evaluation.judge.api_key: unknown key (never put keys in a config"),
    (with_(evaluation__judge={"backend": "openai", "model": "gpt-4", "api_key_env": "sk-abc-123"}),
     "evaluation.judge.api_key_env: must be the NAME of an environment variable"),
    (with_(data__format="preference", data__path="t.jsonl", data__validation_split="test"),
     "data.validation_split: names a split of hf_dataset; for local files use validation_path"),
    (with_(tracking__uri="http://x"), "tracking.uri: unknown key (known: tracking_uri, experiment_name"),
]


@pytest.mark.parametrize("tree, message", BAD_CONFIGS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_CONFIGS)])
def test_bad_config_is_named(tree, message):
    problems = problems_of(tree)
    assert any(p.startswith(message) for p in problems), problems


def test_several_problems_are_reported_together():
    tree = with_(training__beta=-1, data__max_length=0, training__alfa=1)
    problems = problems_of(tree)
    assert len(problems) == 3, problems


def test_embedded_default_is_valid_and_overrides_apply():
    config = load_experiment(None, ["training.alpha=0.9", "training.ref_update=hard", "training.alpha=null"])
    assert config.training.ref_update == "hard" and config.training.alpha is None
    params = config.flat_params()
    assert params["training.tau"] == config.training.tau and params["model.tiny.hidden_size"] == 64


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override({}, "training.alpha")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"training": 3}, "training.alpha=1")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="line 2.*not valid YAML"):
        load_experiment(bad)


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    tree = base_tree()
    tree["data"] = {"format": "preference", "path": "d.jsonl", "max_length": 96, "max_prompt_length": 32}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(tree))
    config = load_experiment(tmp_path / "exp.yaml")
    assert Path(config.data.path) == (tmp_path / "d.jsonl").resolve()


def test_every_field_has_help_text():
    rows = field_help()
    missing = [r.path for r in rows if not r.description]
    assert not missing, missing
    assert {"training.alpha", "training.tau", "training.ref_update", "training.beta"} <= {r.path for r in rows}


def test_validate_cli_exit_codes_and_lines(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(default_config_path().read_text())
    bad = tmp_path / "bad.yaml"
    tree = base_tree()
    tree["training"]["alpha"] = 1.5
    bad.write_text(yaml.safe_dump(tree))
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(good)])
    assert ok.exit_code == 0 and "ok (trdpo, ref_update=soft" in ok.output
    failed = runner.invoke(main, ["validate", str(bad)])
    assert failed.exit_code == 1
    assert f"{bad}: training.alpha: must be ≤ 1.0, got 1.5" in failed.output
    fields = runner.invoke(main, ["fields", "training.tau"])
    assert fields.exit_code == 0 and "Optimizer steps between reference updates" in fields.output


def test_shipped_examples_validate():
    files = sorted((REPO / "examples").glob("*.yaml")) + [default_config_path()]
    result = CliRunner().invoke(main, ["validate", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok (") == len(files) >= 4
    assert "eval_hh_gpt4.yaml: ok (evaluation: 3 policies vs sft, judge openai)" in result.output
