"""Training throughput and step memory, each as a ratio against a baseline measured in the same run.

    python benchmarks/train_throughput.py trl   [--profile hh|uniform|both] [--quick]
    python benchmarks/train_throughput.py trl   --profile matrix --precision fp32 --repeats 1   # 3 length profiles x 2 shapes
    python benchmarks/train_throughput.py ray   [--quick]   # Ray Train with 1 worker vs the plain loop, >= 60 s each

(a) ``trl``: three sides train the same model on the same pairs in the same batches and order:

* **ours**: the default path, packed micro-batches and log-probs in chunks through the lm_head;
* **ours, padded**: ``training.packing: false, logprob_chunk_tokens: null`` (one right-padded row
  per sequence, whole logits: the path the fast one is tested against);
* **TRL**: ``DPOTrainer(sync_ref_model=True)``, TRL 1.16's defaults except every setting that
  differs from ours, pinned to one value and printed (``pinned_settings``): precision, gradient
  checkpointing, optimizer implementation, weight decay, betas, clipping, warm-up and schedule,
  batch, lengths, loss, reference update, threads. TRL pads each batch to its longest sequence
  (its padding-free mode is switched off in 1.16) and scores every position with its fused,
  tiled lm_head.

Two length profiles: **uniform**, the bundled synthetic task (short, nearly equal lengths; a
10.8M-parameter Llama, byte tokenizer), and **hh**, Anthropic-HH-like lengths (prompts lognormal
with a median of ~100 tokens, responses ~60, tails to max_length 512) with a GPT-NeoX-shaped model
at Pythia's vocabulary (50,304; a word-level tokenizer, one token per word). No pair is truncated
on either side (the generator keeps prompts within max_prompt_length and responses within what
is left), so both sides score exactly the same tokens.

Each side runs in its own process, in turns (``--repeats``). A step's time is measured between
the hooks at the end of consecutive steps (ours: ``TrainSpec.step_logger``; TRL: a
``TrainerCallback.on_step_end`` after TRL's reference-sync callback), from the end of step 1 to
the end of step N-1; per step the fastest repeat counts. Memory: a thread samples the process's
RSS every 5 ms (on a GPU: ``torch.cuda.max_memory_allocated``); the **step working memory** is the
peak over steps 1..N-1 above the RSS just before step 1, less the gradients and AdamW state that
step 1 allocates for good (the same on every side: 12 bytes per parameter in fp32).

**matrix** (``--profile matrix``): three length profiles users bring, each on two model shapes,
with ``max_length`` 512 and 8 pairs per step:

* length profiles: **hh** (the HH-like profile above), **tldr** (TL;DR-like: prompts of 350-450
  tokens, responses of 20-60, all drawn uniformly), **mid** (every sequence ~140-160 tokens:
  prompts 95-105, responses 45-55; three fit a 512-token row);
* shapes: **head-heavy**, the GPT-NeoX 4 x 256 at vocabulary 50,304 above (the lm_head is most of
  the FLOPs), and **body-heavy** (``-body``): GPT-NeoX 6 x 384 at a byte-sized vocabulary of 259,
  where the blocks do over 99% of the FLOPs, as in Pythia-1B and up (the share is computed from
  the model and the data's lengths and printed per cell).

Each cell prints packed/padded speed, the ratio of peak RSS and of step working memory, the
largest difference of the training loss between the packed and the padded path over the logged
steps, ours/TRL, the share of micro-batches the cost model packed and the attention's share of
its estimate; then one markdown table of every cell and one line per target of issue 23 (met or
not, by how much).

``--quick``: tiny models, a few steps, every side and profile: checks the script runs end to end
and prints its ratio lines; the numbers mean nothing.

The sides also run in-process with LoRA and ``ref_update: none`` (``Bench.lora``, ``ref_update``;
TRL gets the same ``peft_config`` and our initial adapter): tests/integration/test_trl_parity.py
compares their per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.config import DataConfig, LoraConfig, ModelConfig, TokenizerConfig, TrainingConfig  # noqa: E402
from trainers.data.synthetic import HH_LIKE, MID_LENGTH, TLDR_LIKE, LengthProfile, UniformLengths  # noqa: E402

MB = 2**20


@dataclass(frozen=True)
class Bench:
    profile: str  # a key of PROFILES: "uniform" is the bundled synthetic task, the others a length profile x model shape
    family: str
    model: dict = field(hash=False)  # the architecture's config fields
    batch: int  # pairs per step (no accumulation on either side)
    max_length: int
    max_prompt_length: int
    num_pairs: int
    steps: int
    tau: int
    alpha: float = 0.6
    beta: float = 0.1
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 42
    lengths: LengthProfile | UniformLengths | None = None  # gpt_neox cells: the token counts drawn
    shape: str = "head-heavy"  # which share of the FLOPs dominates: the lm_head's or the blocks'
    ref_update: str = "soft"  # "none": vanilla DPO against the initial model (alpha and tau unused)
    # LoRA on both sides (ours: model.lora; TRL: the same peft_config, its reference the adapter switched off)
    lora: LoraConfig | None = field(default=None, hash=False)


LLAMA_6x384 = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6, intermediate_size=1024,
                   max_position_embeddings=128)
# GPT-NeoX as Pythia builds it (parallel attention and MLP, a quarter of each head rotary, untied
# head) at Pythia's vocabulary, narrow enough for a 2-core CPU: the lm_head is half the model.
NEOX_4x256 = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, rotary_pct=0.25,
                  use_parallel_residual=True, tie_word_embeddings=False, vocab_size=50304, max_position_embeddings=1024)
# The paper's kind of model: the blocks dominate the FLOPs (the GPT-NeoX 6 x 384 at a
# byte-sized vocabulary of 259 words; lm_head 0.1M of 10.7M parameters).
NEOX_6x384 = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, rotary_pct=0.25,
                  use_parallel_residual=True, tie_word_embeddings=False, vocab_size=259, max_position_embeddings=1024)
# (max_prompt_length, steps): TL;DR prompts run to 450 tokens, so its responses get the 61 left of 512.
LENGTHS = {"hh": (HH_LIKE, 256), "tldr": (TLDR_LIKE, 450), "mid": (MID_LENGTH, 256)}
PROFILES = {
    "uniform": Bench("uniform", "llama", LLAMA_6x384, batch=8, max_length=96, max_prompt_length=32, num_pairs=4000,
                     steps=40, tau=4),
    "hh": Bench("hh", "gpt_neox", NEOX_4x256, batch=8, max_length=512, max_prompt_length=256, num_pairs=800, steps=12, tau=4,
                lengths=HH_LIKE),
}
# The length profiles x model shapes matrix (--profile matrix): short runs, the sides measured in turns.
for _name, (_lengths, _prompt) in LENGTHS.items():
    for _shape, _model, _suffix in (("head-heavy", NEOX_4x256, ""), ("body-heavy", NEOX_6x384, "-body")):
        PROFILES.setdefault(_name + _suffix, Bench(_name + _suffix, "gpt_neox", _model, batch=8, max_length=512,
                                                   max_prompt_length=_prompt, num_pairs=200, steps=6, tau=4,
                                                   lengths=_lengths, shape=_shape))
MATRIX = ("hh", "tldr", "mid", "hh-body", "tldr-body", "mid-body")


def quick_bench(b: Bench) -> Bench:
    """Tiny model, a quarter of the lengths, a few steps: the same code path in seconds."""
    if b.family == "llama":
        return replace(b, model=dict(b.model, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                     intermediate_size=64), batch=2, num_pairs=48, steps=5, tau=2)
    lengths = b.lengths
    if isinstance(lengths, UniformLengths):
        lengths = UniformLengths(tuple(n // 4 for n in lengths.prompt), tuple(n // 4 for n in lengths.response))
    else:
        lengths = replace(lengths, prompt_median=20, response_median=12)
    return replace(b, model=dict(b.model, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=min(4096, b.model["vocab_size"])),
                   batch=2, max_length=128, max_prompt_length=b.max_prompt_length // 4, num_pairs=48, steps=5, tau=2,
                   lengths=lengths)


QUICK = {name: quick_bench(b) for name, b in PROFILES.items()}
SIDES = ("ours", "ours, padded", "TRL")


def pinned_settings(b: Bench, precision: str, checkpointing: bool, threads: int) -> dict[str, str]:
    """Every setting that differs between our loop's and TRL 1.16's defaults, as both sides run it."""
    return {
        "precision": "bf16 autocast, fp32 master weights" if precision == "bf16" else "fp32 (TRL's bf16=True default off)",
        "gradient checkpointing": ("on both sides: ours training.activation_checkpointing, TRL gradient_checkpointing "
                                   "(non-reentrant both)") if checkpointing
        else "off both sides (TRL 1.16 defaults it on)",
        "optimizer": "torch.optim.AdamW, default implementation (TRL optim='adamw_torch', not transformers 5's "
                     "default 'adamw_torch_fused')",
        "weight decay": "0.0", "betas / eps": "(0.9, 0.999) / 1e-8", "gradient clipping": f"max norm {b.max_grad_norm}",
        "learning rate": f"{b.learning_rate:g}, constant, 0 warmup steps",
        "batch": f"{b.batch} pairs per step, no accumulation, 1 process (ours: one token budget of 2 x {b.batch} x "
                 f"{b.max_length} per micro-batch, its default)",
        "lengths": f"max_length {b.max_length}, max_prompt_length {b.max_prompt_length} (no pair is truncated either side)",
        "loss": f"sigmoid DPO, beta {b.beta}, summed log-probs, no dropout",
        "reference update": f"soft, alpha {b.alpha} every {b.tau} steps (TRL sync_ref_model=True)",
        "data": "the same pairs in the same batches and order on all sides (our loop's seeded order; TRL is given "
                "that sequence with train_sampling_strategy='sequential')",
        "threads": f"{threads} torch threads, dataloader in-process (0 workers)",
        "logging": "ours: metrics every step (the step hook); TRL: logging_steps > max_steps, no progress bar",
    }


# ------------------------------------------------------------------------------------- inputs


def prepare(b: Bench, directory: Path) -> tuple[Path, Path, Path]:
    """The model (random weights, seeded), its tokenizer and the data files every side reads."""
    import transformers

    from trainers.model.build import make_byte_tokenizer, make_word_tokenizer
    from trainers.data.synthetic import length_profile_texts, make_pairs

    model_dir = directory / "model"
    torch.manual_seed(b.seed)
    if b.family == "llama":
        tokenizer = make_byte_tokenizer()
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **b.model)
        rows = [(p.prompt, p.chosen, p.rejected) for p in make_pairs(b.num_pairs, 0)]
    else:
        tokenizer = make_word_tokenizer(b.model["vocab_size"])
        config = transformers.GPTNeoXConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2, **b.model)
        vocab = b.model["vocab_size"]
        # Prompt <= max_prompt_length, response + EOS <= what is left: nothing is truncated on either side.
        rows = length_profile_texts(b.num_pairs, b.seed, b.lengths, b.max_prompt_length, b.max_length - b.max_prompt_length - 1,
                                    word=lambda rng: f"w{rng.randrange(4, vocab)}", separator=" ")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train_file, validation_file = directory / "train.jsonl", directory / "validation.jsonl"
    for path, part in ((train_file, rows[:-4]), (validation_file, rows[-4:])):
        path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in part))
    return model_dir, train_file, validation_file


def training_config(b: Bench, side: str, precision: str = "fp32", checkpointing: bool = False) -> TrainingConfig:
    fast = {} if side == "ours" else {"packing": False, "logprob_chunk_tokens": None}
    return TrainingConfig(
        ref_update=b.ref_update, alpha=b.alpha if b.ref_update == "soft" else None,
        tau=None if b.ref_update == "none" else b.tau, beta=b.beta, loss="sigmoid", average_log_prob=False,
        learning_rate=b.learning_rate, weight_decay=0.0, adam_betas=(0.9, 0.999), lr_scheduler="constant", warmup_steps=0,
        max_grad_norm=b.max_grad_norm, per_device_batch_size=b.batch, gradient_accumulation_steps=1, max_steps=b.steps,
        num_workers=1, log_every=1, eval_every=None, checkpoint_every=None, keep_checkpoints=1, precision=precision,
        activation_checkpointing=checkpointing, seed=b.seed, **fast)


def data_config(b: Bench, train_file: Path, validation_file: Path) -> DataConfig:
    return DataConfig(format="preference", path=str(train_file), validation_path=str(validation_file),
                      max_length=b.max_length, max_prompt_length=b.max_prompt_length)


def our_order(b: Bench, train_file: Path, validation_file: Path) -> list:
    """The examples our loop trains on, step after step, in its order (a pure function of seed and
    step): TRL is fed the same sequence, so every side computes the same batches."""
    from trainers.data.batching import DataOrder
    from trainers.data.loading import load_examples

    examples, _ = load_examples(data_config(b, train_file, validation_file), "train")
    order = DataOrder(examples, training_config(b, "ours"), world=1)
    return [e for step in range(1, b.steps + 1) for e in order.step_pairs(step)]


# -------------------------------------------------------------------------------------- sides


class StepProbe:
    """Timestamps at the end of every step, and the step's memory: RSS (or CUDA allocation) peak
    over steps 1..N-1 above the level just before step 1."""

    def __init__(self, b: Bench):
        from memory import PeakRSS

        self.b, self.stamps, self.threads, self.logged = b, {}, set(), {}
        self.cuda = torch.cuda.is_available()
        self.rss = None if self.cuda else PeakRSS()
        self.before = self.peak = 0

    def start(self) -> None:  # just before step 1
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = self.rss.reset()

    def step_end(self, step: int, metrics: dict | None = None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps[step] = time.perf_counter()
        if metrics:  # ours: the loss (packed and padded must agree) and the layout the cost model chose
            self.logged[step] = {k.removeprefix("train/"): float(metrics[k]) for k in LOGGED if k in metrics}
        self.threads.add(torch.get_num_threads())
        if step == self.b.steps - 1:
            self.peak = torch.cuda.max_memory_allocated() if self.cuda else self.rss.read()

    def result(self, params: int, built: dict) -> dict:
        if self.rss is not None:  # its sampling thread would poll for as long as the process lives
            self.rss.stop()
        missing = [s for s in range(1, self.b.steps) if s not in self.stamps]
        if missing:
            raise RuntimeError(f"no timestamp for step(s) {missing}; got {sorted(self.stamps)}")
        persistent = 12 * params  # fp32 gradients + AdamW exp_avg and exp_avg_sq, kept from step 1 on
        return {"times": {s: self.stamps[s] - self.stamps[s - 1] for s in range(2, self.b.steps)},
                "step_mb": (self.peak - self.before - persistent) / MB, "peak_mb": self.peak / MB,
                "logged": self.logged, "built": {**built, "threads": sorted(self.threads)}}


LOGGED = ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/padding_fraction", "train/packed_fraction",
          "train/attention_share")


def describe_adamw(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}(foreach={d.get('foreach')}, fused={d.get('fused')}, " \
           f"betas={tuple(d['betas'])}, eps={d['eps']}, weight_decay={decays})"


def run_ours(b: Bench, side: str, directory: Path, precision: str, checkpointing: bool,
             on_policy: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Our loop in this process; ``on_policy`` sees the policy as step 1 is about to start (its
    initial weights: with LoRA, the adapter another side must start from)."""
    from trainers import loop
    from trainers.model.sharding import use_bf16
    from trainers.sessions import LocalSession
    from trainers.state.storage import Storage

    model_dir, train_file, validation_file = directory / "model", directory / "train.jsonl", directory / "validation.jsonl"
    probe = StepProbe(b)
    training = training_config(b, side, precision, checkpointing)
    built_optimizer = {}

    def make_optimizer(policy, cfg):  # the loop builds its optimizer right before step 1
        optimizer = original_make_optimizer(policy, cfg)
        if on_policy is not None:
            on_policy(policy)
        built_optimizer["optimizer"] = describe_adamw(optimizer)
        built_optimizer["params"] = sum(p.numel() for p in policy.parameters())
        probe.start()
        return optimizer

    original_make_optimizer, loop.make_optimizer = loop.make_optimizer, make_optimizer
    try:
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as out:
            spec = loop.TrainSpec(ModelConfig(name_or_path=str(model_dir), lora=b.lora), TokenizerConfig(name_or_path=str(model_dir)),
                                  data_config(b, train_file, validation_file), training, out,
                                  step_logger=lambda metrics: probe.step_end(int(metrics["step"]), metrics))
            loop.train(spec, LocalSession(lambda metrics, saved: None, Storage(out).child(loop.CHECKPOINTS), keep=1))
    finally:  # callers in the same process (tests) get the loop back as it was
        loop.make_optimizer = original_make_optimizer
    return probe.result(built_optimizer.pop("params"), {
        **built_optimizer, "checkpointing": training.activation_checkpointing,
        "precision": "bf16" if use_bf16(precision, torch.device("cuda" if probe.cuda else "cpu")) else "fp32"})


def run_trl(b: Bench, directory: Path, precision: str, checkpointing: bool,
            initial_adapter: dict[str, torch.Tensor] | None = None) -> dict:
    """TRL's DPOTrainer in this process. With ``b.lora``: ``peft_config`` and no ``ref_model`` (TRL's
    reference is then the adapter switched off), the adapter started from ``initial_adapter`` (our
    policy adapter's tensors by our parameter names, see :func:`lora_tensors`): PEFT draws ``A`` at
    random, so both sides must start from the same one."""
    import datasets
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    # TRL 1.16 still calls transformers' renamed gradient_checkpointing_* methods: one warning per step otherwise.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    model_dir = directory / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = our_order(b, directory / "train.jsonl", directory / "validation.jsonl")  # taken in this order (sequential sampler)
    data = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                              "rejected": [p.rejected for p in pairs]})
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    if b.lora is not None and initial_adapter is None:
        raise ValueError("run_trl with LoRA needs initial_adapter: the other side's initial adapter tensors")
    reference = AutoModelForCausalLM.from_pretrained(model_dir) if b.lora is None else None
    peft_config = None if b.lora is None else trl_peft_config(b.lora, initial_adapter)
    if b.ref_update not in ("soft", "none"):
        raise ValueError(f"run_trl: TRL has no {b.ref_update!r} reference update")
    reference_sync = (dict(sync_ref_model=True, ref_model_mixup_alpha=b.alpha, ref_model_sync_steps=b.tau)
                      if b.ref_update == "soft" else {})
    probe = StepProbe(b)
    step_metrics: dict[str, float] = {}

    class Recording(DPOTrainer):
        """Keeps the loss TRL backpropagates, per step and in full precision (the Trainer logs the
        mean over its logging window, which transformers 4 rounded to 4 digits), with the step's
        reward margin and chosen log-prob from TRL's own metrics."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                metrics = self._metrics["train"]
                step_metrics.update({"train/loss": float((out[0] if return_outputs else out).detach()),
                                     "train/rewards/margins": metrics["rewards/margins"][-1],
                                     "train/logps/chosen": metrics["logps/chosen"][-1]})
            return out

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe.start()

        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(state.global_step, dict(step_metrics))
            step_metrics.clear()

    with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as out:
        args = DPOConfig(
            output_dir=out, use_cpu=not probe.cuda, seed=b.seed, report_to=[], save_strategy="no", eval_strategy="no",
            logging_steps=b.steps + 1, disable_tqdm=True, dataloader_num_workers=0,
            per_device_train_batch_size=b.batch, gradient_accumulation_steps=1, max_steps=b.steps,
            max_length=b.max_length, truncation_mode="keep_start", train_sampling_strategy="sequential",
            loss_type=["sigmoid"], beta=b.beta, **reference_sync,
            # TRL 1.16 defaults that differ from our loop, pinned:
            bf16=precision == "bf16",  # default True, even on CPU
            **checkpointing_args(checkpointing),  # default on
            optim="adamw_torch",  # transformers 5 defaults to "adamw_torch_fused"
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=b.max_grad_norm,
            learning_rate=b.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        )
        trainer = Recording(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer,
                            peft_config=peft_config)
        if initial_adapter is not None:
            load_initial_adapter(trainer.model, initial_adapter)
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
        trainer.add_callback(Probe())  # after TRL's SyncRefModelCallback: a step's time includes its reference sync
        trained = trainer.train()
    losses = [m["loss"] for m in probe.logged.values() if "loss" in m]
    if len(losses) != b.steps or abs(sum(losses) / len(losses) - trained.training_loss) > 1e-6:
        raise RuntimeError(f"the per-step losses recorded ({losses}) are not the ones TRL trained on (mean "
                           f"{trained.training_loss})")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    mixed = str(getattr(trainer.accelerator, "mixed_precision", "?"))
    return probe.result(sum(p.numel() for p in trainer.model.parameters()), {
        "optimizer": describe_adamw(optimizer), "checkpointing": is_checkpointing(policy),
        "precision": "bf16" if mixed == "bf16" else "fp32" if mixed == "no" else mixed})


OUR_ADAPTER, TRL_ADAPTER = "policy", "default"  # trainers.model.lora.POLICY; PEFT's adapter name, which TRL keeps


def lora_tensors(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of our policy adapter's LoRA tensors (full tensors, also under FSDP), by parameter name."""
    from trainers.model.lora import POLICY, is_adapter_key

    assert POLICY == OUR_ADAPTER
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for name, t in policy.named_parameters() if is_adapter_key(name) and f".{POLICY}." in name}


def trl_peft_config(lora: LoraConfig, initial_adapter: dict[str, torch.Tensor]):
    """PEFT's LoraConfig for TRL as ours builds its policy adapter, with the target modules named
    explicitly: the modules our adapter sits on (ours may say 'all-linear')."""
    from peft import LoraConfig as PeftLoraConfig

    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in initial_adapter})
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")


@torch.no_grad()
def load_initial_adapter(model: torch.nn.Module, initial_adapter: dict[str, torch.Tensor]) -> None:
    """Copy our initial adapter into TRL's PEFT model, name by name; every LoRA tensor on either side
    must find its counterpart of the same shape (a silent mismatch would compare different models)."""
    theirs = {name: t for name, t in model.named_parameters() if ".lora_" in name}
    mapped = {name.replace(f".{TRL_ADAPTER}.", f".{OUR_ADAPTER}."): name for name in theirs}
    if set(mapped) != set(initial_adapter) or len(mapped) != len(theirs):
        raise RuntimeError(f"LoRA tensors differ between the sides: only TRL's {sorted(set(mapped) - set(initial_adapter))}, "
                           f"only ours {sorted(set(initial_adapter) - set(mapped))}")
    for ours, name in mapped.items():
        if theirs[name].shape != initial_adapter[ours].shape:
            raise RuntimeError(f"{name}: TRL's shape {tuple(theirs[name].shape)}, ours {tuple(initial_adapter[ours].shape)}")
        theirs[name].copy_(initial_adapter[ours])


def checkpointing_args(on: bool) -> dict:
    """TRL's gradient checkpointing, under the name this transformers reads (5.x renamed it to
    activation_checkpointing; the old name is a deprecated alias that TRL's default still sets)."""
    from trl import DPOConfig

    prefix = "activation" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def is_checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    raise RuntimeError(f"cannot tell whether {type(model).__name__} checkpoints activations")


def native_bf16() -> bool:
    """Whether bf16 runs natively here (a GPU, or a CPU with AVX-512 BF16 / AMX); else it is emulated."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run_side(args) -> None:
    """One side in this process (the parent runs each side in a fresh one): prints a RESULT line."""
    torch.set_num_threads(args.threads)
    b = (QUICK if args.quick else PROFILES)[args.profile]
    b = replace(b, steps=args.steps or b.steps)
    directory = Path(args.dir)
    if args.side == "TRL":
        result = run_trl(b, directory, args.precision, args.checkpointing == "on")
    else:
        result = run_ours(b, args.side, directory, args.precision, args.checkpointing == "on")
    print("RESULT " + json.dumps(result), flush=True)


def side_process(side: str, profile: str, directory: Path, precision: str, checkpointing: bool, args) -> dict:
    cmd = [sys.executable, __file__, "_side", side, "--profile", profile, "--dir", str(directory), "--precision", precision,
           "--checkpointing", "on" if checkpointing else "off", "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} ({profile}) failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["times"] = {int(k): v for k, v in result["times"].items()}
    result["logged"] = {int(k): v for k, v in result["logged"].items()}
    return result


def pairs_per_s(times: dict[int, float], b: Bench) -> float:
    return len(times) * b.batch / sum(times.values())


def compare(args) -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        sys.exit('train_throughput.py trl needs TRL: pip install -e ".[bench]"')
    import transformers
    import trl as trl_module

    profiles = {"both": ("uniform", "hh"), "matrix": MATRIX}.get(args.profile, (args.profile,))
    sides = tuple(side for side in SIDES if side != "TRL" or args.trl)
    cells = []
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    if args.precision == "auto":
        precisions = ("fp32", "bf16") if args.quick or native_bf16() else ("fp32",)
        if "bf16" not in precisions:
            print("bf16 skipped: this CPU has no native bf16 (oneDNN reports none; a bf16 matmul is emulated, tens of "
                  "times slower than fp32). --precision bf16 measures it anyway.", flush=True)
    modes = (False, True) if args.checkpointing == "both" else ({"off": False, "on": True}[args.checkpointing],)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    print(f"{'QUICK (checks the script; numbers mean nothing): ' if args.quick else ''}torch {torch.__version__}, "
          f"transformers {transformers.__version__}, TRL {trl_module.__version__}, {device}", flush=True)
    for profile in profiles:
        b = (QUICK if args.quick else PROFILES)[profile]
        b = replace(b, steps=args.steps or b.steps)
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as tmp:
            model_dir, train_file, validation_file = prepare(b, Path(tmp))
            lengths = profile_summary(b, model_dir, train_file)
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
            params = sum(p.numel() for p in model.parameters())
            share = block_flop_share(model, model_dir, train_file, b)
            print(f"\n#### profile {profile}: {b.family} {b.model['num_hidden_layers']} x {b.model['hidden_size']}, vocabulary "
                  f"{b.model.get('vocab_size', 259)} ({params / 1e6:.1f}M parameters; {b.shape}: the blocks do {share:.1%} of "
                  f"a padded forward's FLOPs); {lengths}; {b.steps} steps of {b.batch} pairs per side, steps 2..{b.steps - 1} "
                  f"timed, {args.repeats} repeat(s) per side in turns", flush=True)
            for checkpointing in modes:
                for precision in precisions:
                    label = f"{profile}, {precision}, checkpointing {'on' if checkpointing else 'off'}"
                    print(f"\n== {label}; pinned on all sides:", flush=True)
                    for key, value in pinned_settings(b, precision, checkpointing, args.threads).items():
                        print(f"   {key}: {value}")
                    fastest: dict[str, dict[int, float]] = {side: {} for side in sides}
                    memory: dict[str, float] = {}
                    peak: dict[str, float] = {}
                    logged: dict[str, dict] = {}
                    built = {}
                    # The quick mode runs the sides at once (its numbers mean nothing anyway).
                    with ThreadPoolExecutor(max_workers=len(sides) if args.quick else 1) as pool:
                        for repeat in range(args.repeats):
                            results = list(pool.map(lambda side: side_process(side, profile, Path(tmp), precision,
                                                                              checkpointing, args), sides))
                            for side, result in zip(sides, results):
                                fastest[side] = {k: min(v, fastest[side].get(k, v)) for k, v in result["times"].items()}
                                memory[side] = min(result["step_mb"], memory.get(side, result["step_mb"]))
                                peak[side] = min(result["peak_mb"], peak.get(side, result["peak_mb"]))
                                logged[side] = result["logged"]
                                built[side] = result["built"]
                                print(f"   {side:>13}, repeat {repeat + 1}: {pairs_per_s(result['times'], b):7.2f} pairs/s, "
                                      f"step working memory {result['step_mb']:7.0f} MB (peak {result['peak_mb']:.0f} MB)",
                                      flush=True)
                    for key in ("optimizer", "checkpointing", "precision", "threads"):
                        values = {side: built[side][key] for side in sides}
                        print(f"   built, {key}: " + " | ".join(f"{side} {value}" for side, value in values.items()))
                        if len({json.dumps(v) for v in values.values()}) != 1:
                            raise SystemExit(f"settings differ between the sides ({key}): {values}")
                    rate = {side: pairs_per_s(times, b) for side, times in fastest.items()}
                    trl_rate = (f", TRL DPOTrainer(sync_ref_model) {rate['TRL']:.2f}; ratio vs TRL "
                                f"{rate['ours'] / rate['TRL']:.3f}x" if "TRL" in rate else "")
                    print(f"{label}: ours {rate['ours']:.2f} pairs/s, ours padded {rate['ours, padded']:.2f}{trl_rate}, "
                          f"vs our padded path {rate['ours'] / rate['ours, padded']:.3f}x (per step the fastest of "
                          f"{args.repeats} repeat(s))", flush=True)
                    trl_memory = (f", TRL {memory['TRL']:.0f} MB; ratio vs TRL {memory['ours'] / memory['TRL']:.3f}x"
                                  if "TRL" in memory else "")
                    print(f"{label}: step working memory ours {memory['ours']:.0f} MB, ours padded {memory['ours, padded']:.0f} MB"
                          f"{trl_memory}, vs our padded path {memory['ours'] / memory['ours, padded']:.3f}x; peak RSS "
                          f"{peak['ours'] / peak['ours, padded']:.3f}x the padded path's", flush=True)
                    cells.append(Cell(b, share, precision, rate, memory, peak, logged))
    if len(cells) > 1 or args.profile == "matrix":
        print_matrix(cells)


@dataclass
class Cell:
    """One profile x shape x precision: what every side measured."""

    bench: Bench
    block_share: float
    precision: str
    rate: dict[str, float]
    step_mb: dict[str, float]
    peak_mb: dict[str, float]
    logged: dict[str, dict[int, dict[str, float]]]

    def loss_gap(self) -> float:
        """Largest |loss ours - loss padded| over the steps both logged: the layouts must agree."""
        ours, padded = self.logged["ours"], self.logged["ours, padded"]
        return max(abs(ours[s]["loss"] - padded[s]["loss"]) for s in ours.keys() & padded.keys())

    def mean_logged(self, key: str) -> float | None:
        values = [m[key] for m in self.logged["ours"].values() if key in m]
        return sum(values) / len(values) if values else None

    def targets(self) -> list[tuple[str, float, float]]:
        """(what, measured, target): the issue's targets for this cell, ratios of the same run."""
        speed = self.rate["ours"] / self.rate["ours, padded"]
        wanted = [("packed/padded", speed, 0.98)]
        if "TRL" in self.rate:
            wanted.append(("ours/TRL", self.rate["ours"] / self.rate["TRL"], 1.0))
        if self.bench.profile == "hh-body":
            wanted.append(("packed/padded, body-heavy HH-like", speed, 1.8))
        if self.bench.profile == "hh":
            wanted.append(("packed/padded, head-heavy HH-like", speed, 4.0))
            if "TRL" in self.rate:
                wanted.append(("ours/TRL, head-heavy HH-like", self.rate["ours"] / self.rate["TRL"], 6.0))
        return wanted


def print_matrix(cells: list[Cell]) -> None:
    """The cells as one markdown table (benchmarks/README.md takes it as printed), then each target."""
    print("\n| profile | shape (blocks' FLOP share) | precision | ours pairs/s | padded pairs/s | packed / padded | "
          "peak RSS packed / padded | step memory packed / padded | max abs loss difference | ours / TRL | "
          "packed micro-batches | attention share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        trl = f"{c.rate['ours'] / c.rate['TRL']:.2f}×" if "TRL" in c.rate else "not run"
        packed, attention = c.mean_logged("packed_fraction"), c.mean_logged("attention_share")
        print(f"| {c.bench.profile} | {c.bench.shape} ({c.block_share:.1%}) | {c.precision} | {c.rate['ours']:.2f} | "
              f"{c.rate['ours, padded']:.2f} | **{c.rate['ours'] / c.rate['ours, padded']:.2f}×** | "
              f"{c.peak_mb['ours'] / c.peak_mb['ours, padded']:.2f}× | {c.step_mb['ours'] / c.step_mb['ours, padded']:.2f}× | "
              f"{c.loss_gap():.1e} | {trl} | {'-' if packed is None else f'{packed:.0%}'} | "
              f"{'-' if attention is None else f'{attention:.1%}'} |")
    for c in cells:
        for what, measured, target in c.targets():
            print(f"target {c.bench.profile} ({c.precision}): {what} {measured:.3f}x, target >= {target}x: "
                  f"{'met' if measured >= target else f'NOT met ({measured / target - 1:+.1%})'}")


def block_flop_share(model, model_dir: Path, train_file: Path, b: Bench) -> float:
    """The blocks' share of a forward's FLOPs when every position reaches the lm_head (the padded
    path): per position 2 x the blocks' parameters plus the attention over its causal prefix (the
    data's mean sequence length / 2 scores, each ``LayoutCost.per_score``), against 2 x the head's."""
    from transformers import AutoTokenizer

    from trainers.data.batching import LayoutCost
    from trainers.data.loading import load_examples, tokenize_examples

    data = data_config(b, train_file, train_file)
    examples, report = load_examples(data, "train")
    pairs = tokenize_examples(examples, AutoTokenizer.from_pretrained(model_dir), data, "bench", report)
    lengths = [len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    cost = LayoutCost.for_model(model, whole_logits=False)
    blocks = cost.per_position + cost.per_score * sum(lengths) / len(lengths) / 2
    return blocks / (blocks + 2.0 * model.get_output_embeddings().weight.numel())


def profile_summary(b: Bench, model_dir: Path, train_file: Path) -> str:
    """Token counts of the data as our loop tokenizes it (prompt and response, percentiles)."""
    from transformers import AutoTokenizer

    from trainers.data.loading import load_examples, tokenize_examples

    data = data_config(b, train_file, train_file)
    examples, report = load_examples(data, "train")
    pairs = tokenize_examples(examples, AutoTokenizer.from_pretrained(model_dir), data, "bench", report)
    prompts = sorted(len(p.prompt_ids) for p in pairs)
    responses = sorted(len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids))

    def percentiles(values: list[int]) -> str:
        return "/".join(str(values[min(len(values) - 1, int(q * len(values)))]) for q in (0.5, 0.9, 0.99)) + f"/{values[-1]}"

    return (f"tokens p50/p90/p99/max: prompts {percentiles(prompts)}, responses {percentiles(responses)}; "
            f"{report.prompts_truncated + report.responses_truncated} truncated")



# ----------------------------------------------------------------------------------------- ray


def _median_metric(tracking_uri: str, key: str) -> float:
    import statistics

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("bench")
    run = next(r for r in client.search_runs([experiment.experiment_id]) if client.get_metric_history(r.info.run_id, key))
    return statistics.median(m.value for m in client.get_metric_history(run.info.run_id, key))


def run_ray(args) -> None:
    """Both sides are whole `trdpo train` commands (start-up included); the full run is tuned to >= 60 s."""
    steps = args.steps or (20 if args.quick else 1500)
    log_every = 5 if args.quick else 10
    model = (["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2"] if args.quick
             else ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=256"])
    common = model + [f"training.max_steps={steps}", "training.eval_every=null", "training.checkpoint_every=null",
                      f"training.log_every={log_every}", f"data.synthetic.num_pairs={200 if args.quick else 4000}",
                      "training.per_device_batch_size=8", f"training.tau={4 if args.quick else 16}",
                      "training.precision=fp32", "training.warmup_steps=0"]
    print(f"{'QUICK (checks the script; numbers mean nothing): ' if args.quick else ''}{steps} steps, "
          f"settings: {' '.join(common)}", flush=True)
    wall, rate = {}, {}
    plain, on_ray = "plain loop (--no-ray)", "Ray Train, 1 worker"

    def measure(name: str, extra: list[str]) -> None:
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as tmp:
            uri = f"sqlite:///{tmp}/m.db"
            sets = common + [f"tracking.tracking_uri={uri}", f"tracking.output_dir={tmp}/runs", "tracking.experiment_name=bench"]
            cmd = [sys.executable, "-m", "orchestrator.cli", "train", *extra, *sum([["--set", c] for c in sets], [])]
            start = time.perf_counter()
            pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
            wall[name] = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rate[name] = _median_metric(uri, "train/pairs_per_s")

    # The worker gets every core the plain loop uses (it sets torch threads to its CPU share).
    sides = {plain: ["--no-ray"], on_ray: ["--set", f"training.resources_per_worker.CPU={os.cpu_count()}"]}
    # Measured one after the other; --quick runs both at once (its times mean nothing anyway).
    with ThreadPoolExecutor(max_workers=2 if args.quick else 1) as pool:
        list(pool.map(measure, sides, sides.values()))
    for name in sides:
        print(f"{name}: {wall[name]:.1f} s wall, median {rate[name]:.1f} pairs/s while training", flush=True)
    print(f"Ray/plain wall-time ratio {wall[on_ray] / wall[plain]:.3f}x (target <= 1.15); "
          f"steady-state step-time ratio {rate[plain] / rate[on_ray]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["trl", "ray", "_side"])
    parser.add_argument("side", nargs="?", choices=SIDES, help=argparse.SUPPRESS)  # _side: the side this process runs
    parser.add_argument("--quick", action="store_true", help="Tiny settings, seconds: checks the script, measures nothing.")
    parser.add_argument("--profile", choices=[*PROFILES, "both", "matrix"], default="both",
                        help="trl: the length profile(s): uniform (the bundled task), hh (HH-like, vocabulary 50k); "
                        "both (default): those two; matrix: hh, tldr, mid on the head-heavy model, then -body on the "
                        "body-heavy one, and a table of every cell.")
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="trl: only our two paths (no TRL side).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per side (trl: >= 4).")
    parser.add_argument("--repeats", type=int, default=None, help="trl: runs per side, in turns; the best is kept (default 2, quick 1).")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off",
                        help="trl: activation checkpointing on all sides, or off (default), or each in turn.")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "both"], default="auto",
                        help="trl: all sides in this precision; auto (default) = fp32, and bf16 too where it is native "
                        "(always both with --quick).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="trl: torch threads (every side).")
    parser.add_argument("--dir", help=argparse.SUPPRESS)  # _side: the prepared model and data
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.what == "trl" and args.steps is not None and args.steps < 4:
        parser.error("trl: --steps must be >= 4 (steps 2..N-1 are timed)")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    {"trl": compare, "ray": run_ray, "_side": run_side}[args.what](args)


if __name__ == "__main__":
    main()
