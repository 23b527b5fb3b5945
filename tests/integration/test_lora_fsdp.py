"""LoRA under FSDP2 (2 gloo ranks, and a 1-rank mesh): the frozen base and the trainable adapters
share each block's unit, 2 workers train what 1 does (same global batch), their sharded checkpoint
exports in one process, and a 2-worker run cut back to a checkpoint continues on 1 worker to what
1 worker trains. Two torchrun launches in all (each launch costs its ranks' imports): the 2 ranks'
run, then one rank's run and its continuation of the 2-rank checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.fsdp_check import save_tiny_family

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WORKER = Path(__file__).with_name("lora_fsdp_worker.py")


def run_ranks(n: int, model_dir: Path, work: Path, port: int, *runs: str) -> list[dict]:
    """One torchrun launch of ``n`` ranks training ``runs`` (directories under ``work``) in turn."""
    outs = [work / f"{run}-world{n}.pt" for run in runs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port),
           str(WORKER), str(model_dir), str(4 // n), *[str(part) for run, out in zip(runs, outs) for part in (work / run, out)]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out, weights_only=False) for out in outs]


def test_two_lora_workers_match_one(tmp_path, free_port):
    model_dir = save_tiny_family("gpt_neox", tmp_path / "neox")
    [two] = run_ranks(2, model_dir, tmp_path, free_port, "run2")
    # The 2-worker run cut back to its checkpoint at step 4 (as if it had stopped after step 5;
    # checkpoint_every=2 and 2 kept: steps 4 and 6 are there): the 1-worker launch continues it
    # after its own run from scratch.
    from trainers.loop import CHECKPOINTS
    from trainers.state.checkpoint import checkpoint_steps
    from trainers.state.storage import Storage

    shutil.copytree(tmp_path / "run2", tmp_path / "shrunk")
    shrunk_checkpoints = Storage(str(tmp_path / "shrunk")).child(CHECKPOINTS)
    steps = checkpoint_steps(shrunk_checkpoints)
    assert [step for step, _ in steps] == [6, 4]
    shutil.rmtree(shrunk_checkpoints.path(steps[0][1]))
    assert [step for step, _ in checkpoint_steps(shrunk_checkpoints)] == [4]
    one, shrunk = run_ranks(1, model_dir, tmp_path, free_port + 1, "run1", "shrunk")
    assert len(one["losses"]) == len(two["losses"]) == 6
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) <= 1e-5
    assert set(one["state"]) == set(two["state"]) and any(".reference." in k for k in one["state"])
    for key, value in one["state"].items():
        assert torch.allclose(value, two["state"][key], rtol=1e-4, atol=1e-6), key
    assert two["errors"][1] is not None and two["errors"][1] <= 1e-5  # logged from the first soft update

    # Continued on 1 worker from the 2 workers' checkpoint at step 4: adapters, reference terms,
    # optimizer and RNG come back on the other world size.
    assert shrunk["steps"] == [5, 6]
    assert max(abs(a - b) for a, b in zip(shrunk["losses"], one["losses"][4:])) <= 1e-5
    assert set(shrunk["state"]) == set(one["state"])
    for key, value in one["state"].items():
        assert torch.allclose(value, shrunk["state"][key], rtol=1e-4, atol=1e-6), key

    # The 2 ranks' sharded checkpoint exports in this one process (DCP reshards): the PEFT adapter
    # holds the policy adapter the ranks trained, and loaded onto the base it is the merged export.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainers.config import LoraConfig, ModelConfig, TokenizerConfig
    from trainers.state.checkpoint_export import ADAPTER_DIR, RunModels, export_checkpoint

    run = RunModels(ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(rank=4, alpha=8)), TokenizerConfig(), "trdpo", "soft")
    checkpoints = Storage(str(tmp_path / "run2")).child(CHECKPOINTS)
    result = export_checkpoint(run, checkpoints, "latest", "policy", Storage(str(tmp_path / "export")), log=lambda line: None)
    assert result.step == 6 and (Path(checkpoints.path(result.checkpoint.split("/checkpoints/")[1])) / "__1_0.distcp").exists()
    saved = load_file(str(tmp_path / "export" / ADAPTER_DIR / "adapter_model.safetensors"))
    trained = {k.replace(".policy.", "."): v for k, v in two["state"].items() if ".policy." in k}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], v) for k, v in trained.items())
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(tmp_path / "export" / ADAPTER_DIR)).eval()
    tokens = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(tokens).logits - merged(tokens).logits).abs().max().item() <= 1e-5
