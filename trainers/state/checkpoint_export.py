"""Export any checkpoint of a run (not only the final policy) as a Hugging Face model: the policy
or the reference, in one process on CPU, whatever the world size that wrote it (DCP reshards).

    pick       a step of the run's checkpoints (any attempt; ``latest``: the newest complete one)
    read       only that role's tensors from the sharded checkpoint (never the optimizer state)
    full FT    the role's weights are the checkpoint's, as saved
    LoRA       the base (``model.name_or_path``, or the tiny model), the adapters of the
               checkpoint attached as in training, then merged: ``W + s·B·A`` per adapted layer
    write      DEST: a merged model directory (``AutoModelForCausalLM.from_pretrained``) with the
               tokenizer; for LoRA also DEST/adapter/, the role's PEFT adapter
               (``PeftModel.from_pretrained(base, DEST/adapter)``)

The reference adapter of a soft run has rank ``lora.soft_rank`` (the stacked policy deltas) and
``lora_alpha`` scaled with it, so PEFT's scaling ``lora_alpha / r`` is the policy's and the loaded
adapter is the merged reference. With ``ref_update: none`` the reference is the base itself:
no adapter is written for it.

    trdpo export exp.yaml --checkpoint 40 --role reference --out exports/ref-40
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainers.compat import load_checkpoint_entries
from trainers.config import ModelConfig, TokenizerConfig
from trainers.errors import UserFacingError
from trainers.state.checkpoint import INFO_FILE, _quiet_single_process, _reader, check_checkpoint, checkpoint_steps
from trainers.state.export import save_model_dir, upload_model_dir
from trainers.state.storage import Storage

ROLES = ("policy", "reference")
ADAPTER_DIR = "adapter"  # under the export: the role's PEFT adapter (LoRA runs)
LATEST = "latest"


class ExportError(UserFacingError, ValueError):
    """A checkpoint or role that the run does not have, or a destination already taken."""


@dataclass(frozen=True)
class RunModels:
    """What an export needs to know about the run that wrote the checkpoints."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    stage: str  # "trdpo" or "sft"
    ref_update: str  # "none" | "soft" | "hard"
    base_digest: str | None = None  # the base model directory's digest when the run was trained (run.json)


@dataclass(frozen=True)
class ExportResult:
    step: int
    checkpoint: str  # the checkpoint's URI
    model_dir: str  # the merged Hugging Face model's URI
    adapter_dir: str | None  # the PEFT adapter's URI (LoRA runs, except a reference that is the base)


def choose_checkpoint(checkpoints: Storage, which: str) -> tuple[int, str]:
    """``(step, "<attempt>/step_…")`` of the complete checkpoint ``which`` (a step number or
    ``latest``) names; the newest attempt's when several wrote the step."""
    found = checkpoint_steps(checkpoints)
    available = sorted({step for step, _ in found})
    listing = f"available steps: {', '.join(map(str, available))} (or '{LATEST}')" if available else "it has none"
    if which == LATEST:
        for step, name in found:
            if check_checkpoint(checkpoints, name) is None:
                return step, name
        raise ExportError(f"no complete checkpoint in {checkpoints.uri}" + (f" ({listing})" if available else ""))
    try:
        wanted = int(which)
    except ValueError:
        raise ExportError(f"--checkpoint {which!r}: a step number or '{LATEST}'; {listing}") from None
    candidates = [name for step, name in found if step == wanted]
    if not candidates:
        raise ExportError(f"no checkpoint at step {wanted} in {checkpoints.uri}; {listing}")
    problems = []
    for name in candidates:
        problem = check_checkpoint(checkpoints, name)
        if problem is None:
            return wanted, name
        problems.append(f"{checkpoints.uri_of(name)} is damaged ({problem})")
    raise ExportError(f"checkpoint step {wanted}: {'; '.join(problems)}; {listing}")


def _lora_model(run: RunModels, tokenizer, adapters: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """The PEFT model of training (base plus adapters), holding the checkpoint's adapters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from trainers.model.build import build_policy
    from trainers.model.lora import attach_adapters, is_adapter_key

    rule = run.ref_update if run.stage == "trdpo" else "none"
    model = attach_adapters(build_policy(run.model, tokenizer), run.model.lora, rule)
    expected = {k for k in get_model_state_dict(model) if is_adapter_key(k)}
    if set(adapters) != expected:
        odd = sorted(set(adapters) ^ expected)
        raise ExportError(f"checkpoint {where} holds other adapters than this run's model.lora builds "
                          f"({len(odd)} differ, e.g. {odd[0]}): was it written by another run?")
    set_model_state_dict(model, adapters, options=StateDictOptions(strict=False))
    return model


def _check_base(run: RunModels) -> None:
    """A LoRA checkpoint holds only adapters: merged onto another base they are another model."""
    from trainers.state.fingerprint import source_digest

    now = source_digest(run.model.name_or_path)
    if run.base_digest is not None and now is not None and now != run.base_digest:
        raise ExportError(f"model.name_or_path: {run.model.name_or_path} changed since the run was trained (its config "
                          "or weight files differ) and a LoRA checkpoint holds only the adapters: export with the "
                          "base the run was trained on")


def _save_adapter_dir(model: torch.nn.Module, adapter: str, run: RunModels, tokenizer, directory: Path) -> None:
    """The ``adapter``'s weights and config as PEFT saves a single adapter (``adapter_config.json``,
    ``adapter_model.safetensors``, names without the adapter's name), and the tokenizer."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = copy.deepcopy(model.peft_config[adapter])
    config.base_model_name_or_path = run.model.name_or_path  # None for the tiny model: the caller builds it
    config.revision = run.model.revision
    config.inference_mode = True
    config.save_pretrained(str(directory))
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))


def export_checkpoint(run: RunModels, checkpoints: Storage, which: str, role: str, dest: Storage, *,
                      overwrite: bool = False, log: Callable[[str], None] = print) -> ExportResult:
    """Write ``role`` of checkpoint ``which`` of ``checkpoints`` to ``dest`` (module docstring)."""
    from trainers.model.build import build_tokenizer

    if role not in ROLES:
        raise ExportError(f"--role {role!r}: one of {', '.join(ROLES)}")
    if run.stage != "trdpo" and role == "reference":
        raise ExportError("--role reference: an SFT run has no reference; export --role policy")
    if dest.exists():
        if not overwrite:
            raise ExportError(f"{dest.uri} already exists; choose another destination or pass --overwrite")
    step, name = choose_checkpoint(checkpoints, which)
    where = checkpoints.uri_of(name)
    info = json.loads(checkpoints.read_text(name, INFO_FILE))
    lora = run.model.lora is not None
    if bool(info.get("adapters_only")) != lora:
        saved = "adapters only (a LoRA run)" if info.get("adapters_only") else "full weights"
        raise ExportError(f"checkpoint {where} holds {saved}, but the run's model.lora is "
                          f"{'set' if lora else 'unset'}: export it with the experiment that trained it")
    tokenizer = build_tokenizer(run.model, run.tokenizer)
    entry = "policy" if lora else role  # LoRA: every adapter lives in the one PEFT model's state
    if not lora and role == "reference" and not info.get("has_reference"):
        raise ExportError(f"checkpoint {where} holds no reference; export --role policy")
    log(f"[trdpo] reading the {role} of step {step} from {where}")
    with _quiet_single_process():
        state = load_checkpoint_entries(_reader(checkpoints, name), {entry})[entry]

    adapter = None
    if lora:
        from trainers.model.lora import INITIAL, merged_weights

        _check_base(run)
        log(f"[trdpo] attaching the adapters to the base ({run.model.name_or_path or 'tiny model'})")
        model = _lora_model(run, tokenizer, state, where)
        base_is_reference = role == "reference" and run.ref_update == "none"
        adapter = None if base_is_reference else role
        if base_is_reference:
            log("[trdpo] with ref_update none the reference is the base model itself: no adapter to write")
        scaling = run.model.lora.alpha / run.model.lora.rank
        state = merged_weights(model.state_dict(), INITIAL if base_is_reference else role, scaling)

    with tempfile.TemporaryDirectory(prefix="trdpo-export-") as tmp:
        log(f"[trdpo] writing the {'merged ' if lora else ''}{role} ({sum(t.numel() for t in state.values()):,} parameters)")
        save_model_dir(state, run.model, tokenizer, Path(tmp))
        del state
        if adapter is not None:
            _save_adapter_dir(model, adapter, run, tokenizer, Path(tmp) / ADAPTER_DIR)
        if overwrite:
            dest.remove()
        log(f"[trdpo] uploading to {dest.uri}")
        upload_model_dir(Path(tmp), dest)
    return ExportResult(step, where, dest.uri, dest.uri_of(ADAPTER_DIR) if adapter is not None else None)
