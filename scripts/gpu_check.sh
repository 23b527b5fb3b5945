#!/usr/bin/env bash
# One short check of the GPU path on a lent CUDA machine (see README "GPU check"):
#  1. on every GPU of the machine (NGPU, default all; FSDP only shards with 2 or more): a tiny GPT-NeoX
#     (Pythia's architecture) loaded once into FSDP2 shards on NCCL with bf16 mixed precision; shard-local
#     soft/hard updates == unsharded updates; activation checkpointing leaves gradients unchanged; a short
#     TR-DPO training on all ranks;
#  2. a 40-step TR-DPO training under torchrun with FSDP2 + bf16 autocast, and the same in fp32.
# Wheels the image lacks (pydantic) travel in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'bf16', torch.cuda.is_bf16_supported())"
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
echo "== 1. GPT-NeoX on $NGPU GPU(s): load once, shard-local updates, checkpointing, training (nccl, bf16)"
timeout 240 torchrun --nproc-per-node "$NGPU" --master-port 29601 -m trainers.fsdp_check --work-dir /tmp/fsdp_check \
  --families gpt_neox llama --train 2>&1 | grep -E "fsdp_check|fsdp_train|Error|error" | tee "$OUT/fsdp_check.txt"
for precision in bf16 fp32; do
  echo "== 2. training, precision=$precision"
  sed "s/precision: bf16/precision: $precision/" scripts/gpu_smoke.yaml > /tmp/smoke_$precision.yaml
  timeout 240 torchrun --nproc-per-node "$NGPU" --master-port 29602 -m trainers.loop /tmp/smoke_$precision.yaml --output-dir /tmp/run_$precision \
    > "$OUT/train_$precision.jsonl" 2> "$OUT/train_$precision.err"; echo "exit $?"
  tail -3 "$OUT/train_$precision.err" | cut -c1-300
  python3 - "$OUT/train_$precision.jsonl" <<'PY'
import json, sys
rows = [json.loads(l)["metrics"] for l in open(sys.argv[1]) if l.startswith("{")]
if not rows: sys.exit("no metrics")
first, last = rows[0], rows[-1]
updates = [r["step"] for r in rows if r.get("train/ref_updated") == 1.0]
print(f"steps {last['step']}, loss {first['train/loss']:.4f} -> {last['train/loss']:.4f}, "
      f"val acc {last.get('val/rewards/accuracy')}, val loss {last.get('val/loss')}, "
      f"max grad norm {max(r['train/grad_norm'] for r in rows):.3f}, ref updates at {updates[:5]}... ({last['train/ref_updates']} total), "
      f"median tokens/s {sorted(r['train/tokens_per_s'] for r in rows[5:])[len(rows[5:])//2]:.0f}")
PY
done
