"""LoRA soft TR-DPO runs as a torchrun rank (``python -m torch.distributed.run ... this_file
MODEL_DIR BATCH RUN_DIR OUT [RUN_DIR OUT ...]``), one after the other in the same process group
(one launch, its imports paid once): FSDP2 over the ranks, frozen base and trainable adapters in
the same blocks. For each run rank 0 writes the logged losses and the full PEFT state to OUT
(torch.save). A RUN_DIR that holds checkpoints is resumed from its newest, whatever the number of
ranks that wrote it."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainers import loop
from trainers.model import sharding
from trainers.sessions import LocalSession
from trainers.state.storage import Storage

model_dir, batch, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
from orchestrator.config import load_experiment  # noqa: E402

config = load_experiment(None, [
    "model.tiny=null", f"model.name_or_path={model_dir}", "model.lora.rank=4", "model.lora.alpha=8",
    "data.synthetic.num_pairs=80", "data.validation_fraction=0.1", "data.max_length=48",
    f"training.per_device_batch_size={batch}", "training.max_steps=6", "training.warmup_steps=0", "training.log_every=1",
    "training.learning_rate=1e-2", "training.eval_every=6", "training.checkpoint_every=2", "training.shard_one_worker=true",
    "training.ref_update=soft", "training.alpha=0.6", "training.tau=2"])
dist.init_process_group("gloo")
built = {}
build = sharding.build_models


def keep(*args, **kwargs):
    built["models"] = build(*args, **kwargs)
    return built["models"]


loop.build_models = keep
for run_dir, out in zip(runs[::2], runs[1::2]):
    logged = []
    spec = loop.TrainSpec(config.model, config.tokenizer, config.data, config.training, run_dir, step_logger=logged.append)
    loop.train(spec, LocalSession(lambda metrics, where: None, Storage(run_dir).child(loop.CHECKPOINTS)))
    model = built["models"].policy
    assert sharding.is_sharded(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"steps": [m["step"] for m in logged], "losses": [m["train/loss"] for m in logged],
                    "errors": [m.get("ref/lora_error") for m in logged],
                    "state": {k: v.clone() for k, v in state.items() if ".lora_" in k}}, out)
dist.destroy_process_group()
