"""scripts/gpu_check.py judges what each step printed and stops at the first wrong result (the
whole script on CPU: tests/integration/test_gpu_check_on_cpu.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def fsdp_output(soft: float = 0.0, grad: float = 0.0, packing_gap: float = 0.0) -> str:
    curve = {"1": {"train/loss": 0.6931, "val/loss": 0.69}, "2": {"train/loss": 0.68, "val/loss": 0.67}}
    fast = {s: {k: v + packing_gap for k, v in m.items()} for s, m in curve.items()}
    record = {"family": "gpt_neox", "world": 1, "curves": {"soft": {"fast": fast, "reference": curve},
                                                             "hard": {"fast": curve, "reference": curve}}}
    return (f"fsdp_check family=gpt_neox world=1 device=cuda load_max_abs_diff=0.000e+00 soft_max_abs_diff={soft:.3e} "
            f"hard_max_abs_diff=0.000e+00 checkpointing_grad_max_abs_diff={grad:.3e}\n"
            f"fsdp_packing {json.dumps(record)}\n")


def test_exact_sharding_and_packing_pass():
    lines = gpu_check.check_sharding(fsdp_output(grad=1e-4), ["gpt_neox"], 1, 1e-2, 1e-4)
    assert [line.split(":")[0] for line in lines] == ["sharding gpt_neox", "packing gpt_neox"]


@pytest.mark.parametrize("output, message", [
    (fsdp_output(soft=1.5e-2), "soft differs from the unsharded rule by 1.500e-02"),
    (fsdp_output(grad=0.5), "activation checkpointing changes gradients"),
    (fsdp_output(packing_gap=1e-3), r"packed \+ chunked differs from padded by 1.000e-03"),
    ("", "no fsdp_check line for gpt_neox on 1 rank"),
])
def test_a_wrong_sharding_or_packing_result_fails(output, message):
    with pytest.raises(gpu_check.CheckFailed, match=message):
        gpu_check.check_sharding(output, ["gpt_neox"], 1, 1e-2, 1e-4)


def falling(step: int) -> float:
    return 0.6931 - 0.01 * (step - 1)


def training_output(updates: list[int], steps: int = 8, loss=falling, val_loss: float = 0.6) -> str:
    rows = [{"step": s, "train/loss": loss(s) if callable(loss) else loss, "train/ref_updated": float(s in updates),
             "train/grad_norm": 1.0, "train/tokens_per_s": 1000.0, **({"val/loss": val_loss} if s == steps else {})}
            for s in range(1, steps + 1)]
    return "\n".join(json.dumps({"metrics": r}) for r in rows) + "\n" + json.dumps({"checkpoint": "x", "step": steps})


def test_training_must_update_the_reference_exactly_every_tau_steps_and_stay_finite():
    _, line = gpu_check.check_training(training_output([2, 4, 6, 8]), tau=2, steps=8)
    assert "reference updated at [2, 4, 6, 8]" in line
    with pytest.raises(gpu_check.CheckFailed, match=r"reference updated at \[4, 8\], expected every 2 steps"):
        gpu_check.check_training(training_output([4, 8]), tau=2, steps=8)
    with pytest.raises(gpu_check.CheckFailed, match="non-finite loss"):
        gpu_check.check_training(training_output([2, 4, 6, 8], loss=float("nan")), tau=2, steps=8)
    with pytest.raises(gpu_check.CheckFailed, match="ended at step 6"):
        gpu_check.check_training(training_output([2, 4, 6], steps=6), tau=2, steps=8)


def test_training_must_lower_the_loss():
    # Hard updates every 2 steps: each pair restarts at log 2 and falls; the mean still falls.
    _, line = gpu_check.check_training(training_output([2, 4, 6, 8], loss=lambda s: 0.6931 if s % 2 else 0.65), tau=2, steps=8)
    assert line.startswith("loss 0.6931 -> 0.6500")
    with pytest.raises(gpu_check.CheckFailed, match="the loss does not fall: step 1 0.6931, mean of the second half 0.6931"):
        gpu_check.check_training(training_output([2, 4, 6, 8], loss=0.6931), tau=2, steps=8)
    with pytest.raises(gpu_check.CheckFailed, match="the loss does not fall"):
        gpu_check.check_training(training_output([2, 4, 6, 8], loss=lambda s: 0.6931 + 0.01 * s), tau=2, steps=8)
    with pytest.raises(gpu_check.CheckFailed, match=r"val/loss 0.6950 at the end is not below its step-0 value log 2"):
        gpu_check.check_training(training_output([2, 4, 6, 8], val_loss=0.695), tau=2, steps=8)


@pytest.mark.integration  # runs the script in a process
def test_without_a_gpu_the_check_refuses_to_pretend():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 1 and "FAIL environment: no CUDA device" in done.stderr


def fake_process_outputs(events: list, quick: bool, overlaps: dict | None = None):
    """A stand-in for ``gpu_check.run``: what each step's process prints, by its log file. With
    ``overlaps``, a process waits (10 s at most) for the one named to have started, and records whether it had."""
    import threading

    started = {name: threading.Event() for name in ("fsdp_check", "memory_plan", "train_soft", "train_lora")}
    steps, tau = (8, 2) if quick else (40, 4)
    fsdp = fsdp_output()
    families = fsdp if quick else fsdp + fsdp.replace("gpt_neox", "llama")
    training = training_output(list(range(tau, steps + 1, tau)), steps)
    lora = "\n".join(line.replace('"val/loss"', '"system/peak_memory_mb_rank0": 400.0, "val/loss"')
                     for line in training.splitlines())
    outputs = {"fsdp_check": families, "train_soft": training, "train_hard": training, "train_lora": lora,
               "memory_plan": "shape  plan 10 MB, measured 20 MB, plan/measured 0.500\nplan/measured over 1 shapes: 0.500 .. 0.500\n",
               "plan_lora": "  total (estimate)      200.0 MiB\n"}

    def run(cmd, log, timeout):
        name = log.stem
        events.append(("start", name))
        if name in started:
            started[name].set()
        if overlaps and name in overlaps:
            events.append(("overlapped", name, started[overlaps[name]].wait(10)))
        events.append(("end", name))
        return outputs[name]

    return run


@pytest.mark.parametrize("quick", [False, True])
def test_the_check_runs_every_step_and_prints_the_same_lines_with_or_without_quick(quick, tmp_path, monkeypatch, capsys):
    events: list = []
    monkeypatch.setattr(gpu_check, "run", fake_process_outputs(events, quick))
    monkeypatch.setattr(gpu_check, "check_export_equals_checkpoint", lambda run_dir: f"{run_dir.name} equal")
    gpu_check.main(["--allow-cpu", "--out", str(tmp_path), *(["--quick"] if quick else [])])
    shown = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert shown == ["== 1. sharding", "PASS sharding gpt_neox", "PASS packing gpt_neox",
                     *([] if quick else ["PASS sharding llama", "PASS packing llama"]),
                     "== 2. training (fp32, sharded on 1 rank(s))", "PASS training soft", "PASS soft",
                     "PASS training hard", "PASS hard", "== 3. memory", "     shape  plan 10 MB, measured 20 MB, plan/measured 0.500",
                     "     plan/measured over 1 shapes", "== 4. LoRA (rank 16, fp32 base, soft, sharded on 1 rank(s))",
                     "PASS LoRA training", "     LoRA peak memory rank 0", "all checks passed"]
    names = ["fsdp_check", "train_soft", "train_hard", "memory_plan", "train_lora", "plan_lora"]
    if not quick:  # each process after the one before it has ended, in step order
        assert events == [(kind, name) for name in names for kind in ("start", "end")]
    else:
        assert sorted(name for kind, name in events if kind == "start") == sorted(names)


def test_quick_runs_the_memory_plan_beside_step_1_and_steps_2_and_4_side_by_side(tmp_path, monkeypatch):
    events: list = []
    overlaps = {"fsdp_check": "memory_plan", "train_soft": "train_lora"}
    monkeypatch.setattr(gpu_check, "run", fake_process_outputs(events, quick=True, overlaps=overlaps))
    monkeypatch.setattr(gpu_check, "check_export_equals_checkpoint", lambda run_dir: f"{run_dir.name} equal")
    gpu_check.main(["--allow-cpu", "--quick", "--out", str(tmp_path)])
    assert sorted(event for event in events if event[0] == "overlapped") == [("overlapped", "fsdp_check", True),
                                                                            ("overlapped", "train_soft", True)]
