"""``trdpo export``: any checkpoint's policy or reference, exported in one process, loads with plain
transformers (and PEFT for LoRA) and equals the weights the training held at that step."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.train import RUN_FILE, run_name_of
from trainers import loop
from trainers.fsdp_check import save_tiny_family
from trainers.model import sharding
from trainers.model.lora import POLICY, REFERENCE, merged_weights
from trainers.sessions import LocalSession
from trainers.state.checkpoint_export import ADAPTER_DIR, RunModels, export_checkpoint
from trainers.state.fingerprint import fingerprint
from trainers.state.storage import Storage

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=6", "training.checkpoint_every=2", "training.keep_checkpoints=10", "training.tau=2",
         "training.ref_update=soft", "training.alpha=0.6", "training.eval_every=6", "training.learning_rate=1e-2"]


def train_run(config, capture):
    """Train ``config`` in this process into its run storage (as ``trdpo train`` names it, with its
    ``run.json``); ``capture(models)`` after every step returns what to remember of it."""
    store = Storage(config.tracking.output_dir).child(run_name_of(config))
    record = {"fingerprint": fingerprint(config.model, config.tokenizer, config.data, config.training), "mlflow_run_id": "x"}
    store.write_text(json.dumps(record), RUN_FILE)
    built, seen = {}, {}
    build = sharding.build_models

    def keep(*args, **kwargs):
        built["models"] = build(*args, **kwargs)
        return built["models"]

    def after_step(uri, step, rank):
        seen[step] = capture(built["models"])

    loop.build_models, saved = keep, loop.build_models
    try:
        spec = loop.TrainSpec(config.model, config.tokenizer, config.data, config.training, store.uri, after_step=after_step)
        loop.train(spec, LocalSession(lambda metrics, where: None, store.child(loop.CHECKPOINTS), keep=10))
    finally:
        loop.build_models = saved
    return store, seen


def clones(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def loaded_state(directory) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory)).state_dict()


@pytest.fixture(scope="module")
def full_run(tiny_config_shared):
    config = tiny_config_shared(*STEPS)
    store, seen = train_run(config, lambda models: (clones(models.policy), clones(models.reference)))
    return config, store, seen


def test_a_middle_checkpoint_exports_its_policy_bitwise_from_the_run_directory(full_run, tmp_path):
    config, store, seen = full_run
    out = tmp_path / "policy-4"
    result = CliRunner().invoke(main, ["export", store.uri, "--checkpoint", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "done: the policy of step 4" in result.output
    exported, policy = loaded_state(out), seen[4][0]
    assert exported.keys() == policy.keys()
    assert all(torch.equal(exported[k], v) for k, v in policy.items())
    assert not torch.equal(exported["model.embed_tokens.weight"], seen[6][0]["model.embed_tokens.weight"])  # not the last
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).pad_token_id is not None
    assert not (out / ADAPTER_DIR).exists()  # full fine-tuning has no adapter


def test_the_reference_exports_from_the_experiment_file(full_run, tmp_path):
    config, store, seen = full_run
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    out = tmp_path / "reference-4"
    result = CliRunner().invoke(main, ["export", str(experiment), "--checkpoint", "4", "--role", "reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported, (policy, reference) = loaded_state(out), seen[4]
    assert all(torch.equal(exported[k], v) for k, v in reference.items())
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[key], policy[key])  # the reference is its own model, moved at steps 2 and 4


def test_a_step_that_is_not_there_is_one_line_listing_the_steps(full_run, tmp_path):
    config, store, seen = full_run
    result = CliRunner().invoke(main, ["export", store.uri, "--checkpoint", "5", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: no checkpoint at step 5 in {store.uri}/checkpoints; available steps: 2, 4, 6 (or 'latest')"]
    assert not (tmp_path / "x").exists()


def test_latest_is_the_last_step_and_a_taken_destination_needs_overwrite(full_run, tmp_path):
    config, store, seen = full_run
    run = RunModels(config.model, config.tokenizer, config.training.stage, config.training.ref_update)
    out = Storage(str(tmp_path / "latest"))
    result = export_checkpoint(run, store.child(loop.CHECKPOINTS), "latest", "policy", out, log=lambda line: None)
    assert result.step == 6
    assert all(torch.equal(loaded_state(out.uri)[k], v) for k, v in seen[6][0].items())
    again = CliRunner().invoke(main, ["export", store.uri, "--out", out.uri])
    assert again.exit_code == 2 and again.output.strip() == f"error: {out.uri} already exists; choose another destination or pass --overwrite"
    replaced = CliRunner().invoke(main, ["export", store.uri, "--checkpoint", "2", "--out", out.uri, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert all(torch.equal(loaded_state(out.uri)[k], v) for k, v in seen[2][0].items())


# LoRA: the adapters of a checkpoint on the base they were trained on.

RANK, LORA_ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def lora_run(tiny_config_shared, tmp_path_factory):
    model_dir = save_tiny_family("llama", tmp_path_factory.mktemp("base") / "llama")
    config = tiny_config_shared(*STEPS, "model.tiny=null", f"model.name_or_path={model_dir}", "tokenizer.kind=pretrained",
                                f"model.lora.rank={RANK}", f"model.lora.alpha={LORA_ALPHA}", "tracking.run_name=lora")

    def merged(models):
        state = models.policy.state_dict()
        return merged_weights(state, POLICY, LORA_ALPHA / RANK), merged_weights(state, REFERENCE, LORA_ALPHA / RANK)

    store, seen = train_run(config, merged)
    return config, model_dir, store, seen


@pytest.mark.parametrize("role", ["policy", "reference"])
def test_a_lora_checkpoint_exports_merged_and_as_a_peft_adapter_that_agree(lora_run, role, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, model_dir, store, seen = lora_run
    out = tmp_path / role
    result = CliRunner().invoke(main, ["export", store.uri, "--checkpoint", "4", "--role", role, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"adapter: {out / ADAPTER_DIR}" in result.output
    expected = seen[4][0 if role == "policy" else 1]
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"], seen[6][0]["model.layers.0.self_attn.q_proj.weight"])

    adapter_config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    rank = config.model.lora.soft_rank if role == "reference" else RANK
    assert adapter_config["r"] == rank and adapter_config["lora_alpha"] / rank == LORA_ALPHA / RANK
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    adapted = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()
    tokens = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (adapted(tokens).logits - merged(tokens).logits).abs().max().item()
        with adapted.disable_adapter():
            moved = (adapted(tokens).logits - merged(tokens).logits).abs().max().item()
    assert gap <= 1e-5, gap
    assert moved > 1e-3  # the adapter is not a no-op: the check above compares something


def test_a_lora_export_refuses_a_base_that_changed_since_training(lora_run, tmp_path):
    import dataclasses
    import shutil

    from orchestrator.export import run_from_storage
    from trainers.state.checkpoint_export import ExportError

    config, model_dir, store, seen = lora_run
    edited = shutil.copytree(model_dir, tmp_path / "edited")
    (edited / "config.json").write_text((edited / "config.json").read_text() + "\n")
    run = run_from_storage(store)
    assert run.model.lora.rank == RANK and run.ref_update == "soft" and run.base_digest
    moved = dataclasses.replace(run, model=run.model.model_copy(update={"name_or_path": str(edited)}))
    with pytest.raises(ExportError, match=rf"^model.name_or_path: {edited} changed since the run was trained"):
        export_checkpoint(moved, store.child(loop.CHECKPOINTS), "4", "policy", Storage(str(tmp_path / "x")), log=lambda line: None)
    assert not (tmp_path / "x").exists()


def test_the_reference_of_a_lora_run_without_updates_is_the_base_and_has_no_adapter(lora_run, tiny_config_shared, tmp_path):
    config, model_dir, store, seen = lora_run
    none = tiny_config_shared(*STEPS, "model.tiny=null", f"model.name_or_path={model_dir}", "tokenizer.kind=pretrained",
                              f"model.lora.rank={RANK}", "training.ref_update=none", "training.alpha=null", "training.tau=null",
                              "training.max_steps=2", "tracking.run_name=lora-none")
    none_store, _ = train_run(none, lambda models: None)
    out = tmp_path / "reference"
    result = CliRunner().invoke(main, ["export", none_store.uri, "--role", "reference", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "the reference is the base model itself: no adapter to write" in result.output and "adapter:" not in result.output
    base = loaded_state(model_dir)
    assert all(torch.equal(loaded_state(out)[k], v) for k, v in base.items())
    assert not (out / ADAPTER_DIR).exists()
