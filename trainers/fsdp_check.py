"""Architecture checks of the sharded training path, on N ranks (gloo on CPU, NCCL on GPU).

    python -m torch.distributed.run --nproc-per-node 2 -m trainers.fsdp_check --work-dir /tmp/x \\
        [--families gpt_neox llama qwen2 gpt2 mistral] [--train]

For each model family a tiny random-weight model is written with ``save_pretrained`` (offline),
then loaded the way training loads it (meta skeleton on every rank, weights read once on rank 0,
broadcast into FSDP2 shards; reference and initial model copied shard-locally) and checked:

* load:  the gathered policy, reference and initial model equal the saved weights;
* soft / hard: the shard-local TR-DPO update equals the same update on the gathered, unsharded
  weights (after a no_grad forward, the case that once left parameters gathered);
* checkpointing: gradients with activation checkpointing equal gradients without.

Rank 0 prints one line per family with the max abs differences. With ``--train`` each family also
runs a short TR-DPO training on all ranks and rank 0 prints its metric curve as a JSON line, for
comparison with a one-worker run (``tests/integration/test_architectures.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.config import DataConfig, ModelConfig, SyntheticDataConfig, TokenizerConfig, TrainingConfig
from trainers.model.sharding import build_models, enable_activation_checkpointing, local_tensors
from trainers.model.build import build_tokenizer, make_byte_tokenizer
from trainers.trdpo import hard_update_, soft_update_

VOCAB = 300  # > the byte tokenizer's 259 ids; not a multiple of 2 so that shards are uneven
SMALL = dict(vocab_size=VOCAB, max_position_embeddings=128)


def tiny_family_config(family: str):
    """A small config of each family; dropout off so that runs on different world sizes agree."""
    import transformers as hf

    if family == "gpt_neox":  # Pythia: parallel attention + MLP, partial rotary, untied head
        return hf.GPTNeoXConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False, **SMALL)
    if family == "llama":
        return hf.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, **SMALL)
    if family == "qwen2":  # tied input/output embeddings, grouped-query attention, q/k/v biases
        return hf.Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=96, tie_word_embeddings=True, **SMALL)
    if family == "gpt2":  # Conv1D projections, tied head, learned position embeddings
        return hf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    if family == "mistral":  # sliding-window attention, grouped-query attention
        return hf.MistralConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96, sliding_window=64, **SMALL)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("gpt_neox", "llama", "qwen2", "gpt2", "mistral")


def save_tiny_family(family: str, path: Path, seed: int = 0) -> Path:
    """A random-weight model of ``family`` with the byte tokenizer, as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def full_state(model) -> dict[str, torch.Tensor]:
    """Gathered to rank 0 (empty on the other ranks), as copies: on one CPU rank the "gathered"
    tensors are the live parameters themselves, which a later in-place update would change too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in state.items()}


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise RuntimeError(f"the two states hold different tensors: {sorted(set(a) ^ set(b))}")
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


def check_family(path: Path, device: torch.device, bf16: bool) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    rank = dist.get_rank()
    model_cfg = ModelConfig(name_or_path=str(path))
    tokenizer = build_tokenizer(model_cfg, TokenizerConfig(name_or_path=str(path)))
    # Sharded even on one rank (a 1-rank mesh): the DTensor path is what is checked.
    models = build_models(model_cfg, tokenizer, preference=True, moving_reference=True, device=device, bf16=bf16,
                          shard_one_worker=True)
    saved = AutoModelForCausalLM.from_pretrained(path).state_dict() if rank == 0 else {}
    out: dict[str, float] = {}
    states = {name: full_state(model) for name, model in (("policy", models.policy), ("reference", models.reference),
                                                          ("initial", models.initial))}
    if rank == 0:
        out["load"] = max(max_diff(state, saved) for state in states.values())

    # Move the policy away from the reference (the same elementwise change on every shard), run a
    # no_grad forward through the reference, then update shard-locally and compare.
    with torch.no_grad():
        for i, p in enumerate(local_tensors(models.policy)):
            p.mul_(1.0 + 0.01 * (i % 7)).add_(0.003)
    ids = torch.randint(3, VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    for mode in ("soft", "hard"):
        policy_full, reference_full = full_state(models.policy), full_state(models.reference)
        with torch.no_grad():
            models.reference(input_ids=ids)
        if mode == "soft":
            soft_update_(local_tensors(models.reference), local_tensors(models.policy), 0.6)
        else:
            hard_update_(local_tensors(models.reference), local_tensors(models.policy))
        got = full_state(models.reference)
        if rank == 0:
            expected = {k: (policy_full[k].clone() if mode == "hard" else torch.lerp(reference_full[k], policy_full[k], 0.6))
                        for k in reference_full}
            out[mode] = max_diff(got, expected)
        with torch.no_grad():  # a fresh gap for the next mode
            for p in local_tensors(models.policy):
                p.add_(0.002)

    def gradients() -> dict[str, torch.Tensor]:
        models.policy.zero_grad(set_to_none=True)
        logits = models.policy(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).backward()
        return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu().clone()
                for n, p in models.policy.named_parameters()}

    plain = gradients()
    enable_activation_checkpointing(models.policy)
    recomputed = gradients()
    out["checkpointing_grad"] = max_diff(plain, recomputed)
    return out


def long_tailed_data(path: Path, num_pairs: int = 170, seed: int = 0) -> Path:
    """A preference file whose lengths are long-tailed (HH-like, scaled to tiny models): packed
    rows then hold sequences of very different lengths, several per row."""
    import string

    from trainers.data.synthetic import LengthProfile, length_profile_texts

    profile = LengthProfile(prompt_median=14, prompt_sigma=0.8, response_median=9, response_sigma=0.8)
    rows = length_profile_texts(num_pairs, seed, profile, 40, 40, word=lambda rng: rng.choice(string.ascii_lowercase))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return path


def train_family(path: Path, out_dir: Path, world: int, data: DataConfig | None = None, steps: int = 4,
                 **training: object) -> dict:
    """A short TR-DPO run; 17 validation pairs, so that validation is uneven across 2 ranks.
    Returns ``{step: {metric: value}}`` for the loss, reward, gradient-norm and validation curves."""
    from trainers.config import TrainSpec
    from trainers.loop import CHECKPOINTS, train
    from trainers.sessions import LocalSession
    from trainers.state.storage import Storage

    # shard_one_worker: under torchrun even one rank trains sharded (in a process with no process
    # group, as the tests' one-worker side, it changes nothing).
    settings = dict(ref_update="soft", alpha=0.6, tau=2, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant",
                    per_device_batch_size=4, gradient_accumulation_steps=max(1, 2 // world), max_steps=steps, log_every=1,
                    eval_every=2, precision="fp32", seed=3, shard_one_worker=True)
    settings.update(training)
    data = data or DataConfig(format="synthetic", synthetic=SyntheticDataConfig(num_pairs=170, seed=0), max_length=48,
                              max_prompt_length=24, validation_fraction=0.1)
    # A fresh run each time (a leftover checkpoint would be resumed). Every rank removes it before
    # the first collective (model building), so no rank has written anything yet.
    shutil.rmtree(out_dir, ignore_errors=True)
    spec = TrainSpec(ModelConfig(name_or_path=str(path)), TokenizerConfig(name_or_path=str(path)), data,
                     TrainingConfig(**settings), str(out_dir))
    curve: dict = {}

    def log(metrics: dict) -> None:
        curve[int(metrics["step"])] = {k: v for k, v in metrics.items()
                                       if k.startswith(("train/loss", "train/rewards", "train/grad_norm", "val/"))}

    spec.step_logger = log
    train(spec, LocalSession(lambda metrics, saved: None, Storage(str(out_dir)).child(CHECKPOINTS), keep=1))
    return curve


# The packed, chunked path against the padded, whole-logits one: the same pairs, the same steps.
FAST = {"packing": True, "logprob_chunk_tokens": 16}  # a small chunk: several chunks per micro-batch
REFERENCE = {"packing": False, "logprob_chunk_tokens": None}
UPDATES = {"soft": {"ref_update": "soft", "alpha": 0.6, "tau": 2}, "hard": {"ref_update": "hard", "alpha": None, "tau": 3}}


def packing_curves(path: Path, work: Path, world: int, data_file: Path) -> dict:
    """``{update: {"fast"|"reference": curve}}``: 16 fp32 steps with accumulation 2, each way."""
    data = DataConfig(format="preference", path=str(data_file), max_length=64, max_prompt_length=32,
                      validation_fraction=0.1)
    out: dict = {}
    for update, rule in UPDATES.items():
        for name, layout in (("fast", FAST), ("reference", REFERENCE)):
            run = work / f"packing-{path.name}-{update}-{name}-world{world}"
            out.setdefault(update, {})[name] = train_family(path, run, world, data, steps=16, per_device_batch_size=4 // world,
                                                            gradient_accumulation_steps=2, eval_every=8, **rule, **layout)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--train", action="store_true", help="Also run a short training per family and print its curve.")
    parser.add_argument("--packing", action="store_true", help="Also train packed+chunked and padded+whole-logits, "
                        "soft and hard, 16 steps each, and print both curves (for comparison).")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    for family in args.families:
        path = args.work_dir / "models" / family
        if rank == 0 and not (path / "config.json").exists():
            save_tiny_family(family, path)
        dist.barrier()
        diffs = check_family(path, device, bf16=cuda)
        if rank == 0:
            shown = " ".join(f"{k}_max_abs_diff={v:.3e}" for k, v in diffs.items())
            print(f"fsdp_check family={family} world={world} device={device.type} {shown}", flush=True)
        if args.train:
            curve = train_family(path, args.work_dir / f"run-{family}-world{world}", world)
            if rank == 0:
                print("fsdp_train " + json.dumps({"family": family, "world": world, "curve": curve}), flush=True)
        if args.packing:
            data_file = args.work_dir / "long_tailed.jsonl"
            if rank == 0 and not data_file.exists():
                long_tailed_data(data_file)
            dist.barrier()
            curves = packing_curves(path, args.work_dir, world, data_file)
            if rank == 0:
                print("fsdp_packing " + json.dumps({"family": family, "world": world, "curves": curves}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
