"""Check that the shard-local reference update equals the same update on unsharded weights.

Run by the tests on 2 CPU processes (gloo) and by the GPU check on CUDA (nccl):

    torchrun --nproc-per-node 2 -m trainers.fsdp_check            # or: python -m trainers.fsdp_check (1 rank)

Policy and reference are tiny Llama models with different weights, sharded alike with FSDP2;
the reference first runs a no_grad forward (the situation that once left parameters gathered),
then gets the soft and the hard update on its local shards. The gathered result is compared with
the update done on plain copies. Prints one line per case with the max abs difference.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainers.config import TinyModelConfig
from trainers.loop import local_tensors, shard_alike
from trainers.models import build_tiny_model
from trainers.trdpo import hard_update_, soft_update_


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check(tied: bool, mode: str, device: torch.device, bf16: bool = False) -> float:
    policy = build_tiny_model(TinyModelConfig(seed=1, tie_word_embeddings=tied), vocab_size=300)
    reference = build_tiny_model(TinyModelConfig(seed=2, tie_word_embeddings=tied), vocab_size=300)
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_full = policy.state_dict()
    for k in expected:  # the update on unsharded copies
        expected[k] = policy_full[k].clone() if mode == "hard" else torch.lerp(expected[k], policy_full[k], 0.6)
    policy, reference = policy.to(device), reference.to(device)
    shard_alike([policy, reference], device, bf16)
    with torch.no_grad():
        reference(torch.randint(0, 300, (2, 16), device=device))
    if mode == "hard":
        hard_update_(local_tensors(reference), local_tensors(policy))
    else:
        soft_update_(local_tensors(reference), local_tensors(policy), 0.6)
    got = full_state(reference)  # gathered to rank 0 (empty elsewhere)
    if dist.get_rank() != 0:
        return 0.0
    diff = max((got[k].float().cpu() - expected[k].float()).abs().max().item() for k in expected)
    names = {k for k in expected if "embed" in k or "lm_head" in k or k.endswith("model.norm.weight")}
    assert names >= {"model.embed_tokens.weight", "model.norm.weight"}, names
    return diff


def main() -> None:
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    for tied in (False, True):
        for mode in ("soft", "hard"):
            diff = check(tied, mode, device, bf16=cuda)
            if rank == 0:
                print(f"fsdp_check world={dist.get_world_size()} device={device.type} tied={tied} mode={mode} max_abs_diff={diff:.3e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
