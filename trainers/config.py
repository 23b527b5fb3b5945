"""Schema of the sections the trainers own: ``model``, ``tokenizer``, ``data`` and ``training``.

Every field carries its help text here and nowhere else; ``trdpo fields`` and the docs read it.
Cross-field rules raise :class:`ConfigProblems`, which names each offending field so that the
orchestrator can print ``training.alpha: ...`` rather than a bare message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_serializer, model_validator
from pydantic_core import PydanticCustomError


_UNSET = "<unset>"  # a private attribute not captured yet (a string: private defaults are deep-copied)


# What each stage's validation reports (trainers.validation), comparable across alpha and tau.
VALIDATION_METRICS = {
    "trdpo": ("val/loss", "val/rewards/accuracy", "val/rewards/margins", "val/logps/chosen", "val/kl_to_initial"),
    "sft": ("val/loss",),
}


class Section(BaseModel):
    """The one base of every config schema (trainers, evaluation, orchestrator, sweep and eval files):
    unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def config_problems(*problems: tuple[str, str]) -> PydanticCustomError:
    """An error carrying ``(field, message)`` pairs relative to the section that raises it."""
    text = "; ".join(f"{f}: {m}" for f, m in problems)
    return PydanticCustomError("config_problems", text, {"problems": list(problems)})


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params, run fingerprints)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise config_problems(*problems)


class TinyModelConfig(Section):
    """A small Llama-architecture model built from a config: no download, for tests and the demo."""

    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads per layer (must divide hidden_size).")
    intermediate_size: int = Field(128, gt=0, description="Width of the MLP.")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence the model can see.")
    tie_word_embeddings: bool = Field(False, description="Share the input embedding and the lm_head weights.")
    seed: int = Field(0, description="Seed for the random initial weights.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise config_problems(("num_heads", f"must divide hidden_size={self.hidden_size}, got {self.num_heads}"))
        return self


class LoraConfig(Section):
    """LoRA adapters on a frozen base (PEFT): one base serves every role. The policy is the base plus a
    trainable adapter, the initial model the base with adapters off, the reference the base plus a
    frozen adapter that follows the TR-DPO rule in weight space (trainers.model.lora)."""

    rank: int = Field(16, gt=0, description="Rank r of the policy adapter.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the adapter's delta is (alpha / rank) * B A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input (policy forward only).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' (every linear layer of the blocks, not the "
        "output head) or a list of module names (e.g. [query_key_value, dense]), as PEFT reads them.")
    base_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the frozen base weights; the adapters stay fp32. bf16 halves the base's memory "
        "and needs training.precision bf16 (or auto on a GPU).")
    reference_rank: int | None = Field(
        None, gt=0, description="Soft update: the most columns the reference adapter keeps (its delta is the exact "
        "weighted sum of the policy's deltas at every update, recompressed by SVD past this rank). Default 8 x rank.")
    reference_rtol: float = Field(
        1e-6, ge=0.0, lt=1.0, description="Soft update: singular values (decayed terms) are dropped while what is "
        "dropped stays within this share of the reference delta's Frobenius norm; logged as ref/lora_error.")

    @property
    def soft_rank(self) -> int:
        return self.reference_rank or 8 * self.rank

    @model_validator(mode="after")
    def _ranks(self) -> "LoraConfig":
        if self.reference_rank is not None and self.reference_rank < self.rank:
            raise config_problems(("reference_rank", f"must be at least rank={self.rank} (the policy's delta must fit), "
                                   f"got {self.reference_rank}"))
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise config_problems(("target_modules", "name at least one module, or 'all-linear'"))
        return self


class ModelConfig(Section):
    """The policy (and, unless ``reference_name_or_path`` is set, its initial reference)."""

    name_or_path: str | None = Field(
        None, description="Hugging Face model name or local directory (AutoModelForCausalLM). Exclusive with 'tiny'."
    )
    tiny: TinyModelConfig | None = Field(None, description="Build a tiny Llama model from this config instead.")
    reference_name_or_path: str | None = Field(
        None, description="Initial reference model if it differs from the policy's starting weights."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub; off unless you trust it.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of name_or_path.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = Field(
        None, description="The attention kernel, as transformers names it. Default: transformers' own (sdpa where the "
        "model supports it). flash_attention_2/3 need the flash-attn package and a GPU, and train in bf16; with packing "
        "each micro-batch is then one row of all its sequences, each attending only to itself (flash-attention's "
        "variable-length kernel, boundaries read from position_ids), so no attention is computed across or on padding.")
    keep_dropout: bool = Field(
        False, description="Keep the model's own dropout while training. Default: every dropout of the policy, the "
        "reference and the initial model is off (TRL's default), so that the policy and the reference score a pair "
        "alike at step 1 (loss ln 2, rewards 0) and the rewards are not noise. The exported config keeps the model's "
        "dropout settings either way.")
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters on a frozen base instead of every weight (null: full fine-tuning), e.g. "
        "{rank: 16}.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.name_or_path is None) == (self.tiny is None):
            raise config_problems(("name_or_path", "set exactly one of 'name_or_path' and 'tiny'"))
        if self.reference_name_or_path and self.tiny is not None:
            raise config_problems(("reference_name_or_path", "a tiny model has no separate reference checkpoint"))
        if self.reference_name_or_path and self.lora is not None:
            raise config_problems(("lora", "with LoRA the reference is the base plus an adapter; a separate "
                                   "reference_name_or_path cannot be one"))
        return self


class TokenizerConfig(Section):
    name_or_path: str | None = Field(
        None, description="Tokenizer name or directory; default: the model's. Required as 'byte' for tiny models."
    )
    kind: Literal["pretrained", "byte"] = Field(
        "pretrained", description="'pretrained' loads name_or_path (or the model's); 'byte' builds a byte-level tokenizer locally."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template to use for conversational data, overriding the tokenizer's."
    )


class SyntheticDataConfig(Section):
    """The bundled synthetic preference task (see trainers.data.synthetic)."""

    num_pairs: int = Field(2000, gt=0, description="Preference pairs to generate.")
    seed: int = Field(0, description="Seed of the prompt generator and of the Bradley-Terry draws.")
    task: Literal["gold", "proxy"] = Field(
        "gold", description="'gold': labels drawn from the gold reward; 'proxy': the harder option, labels from a "
        "misspecified proxy (it also pays for length and hype words, and is soft on negatives; see trainers.data.synthetic), "
        "so a policy that strays far from its start to please the labels loses gold quality. Judges keep the gold reward.")


class DataConfig(Section):
    format: Literal["preference", "hh_rlhf", "tldr", "synthetic"] = Field(
        "preference",
        description=(
            "Row format: 'preference' (prompt/chosen/rejected, strings or chat messages), 'hh_rlhf' "
            "(Anthropic HH full transcripts), 'tldr' (OpenAI summarize-from-feedback comparisons), "
            "'synthetic' (the bundled task)."
        ),
    )
    path: str | None = Field(None, description="Local file: .jsonl, .json, .parquet or .csv.")
    hf_dataset: str | None = Field(None, description="Hugging Face dataset name or directory (datasets.load_dataset).")
    hf_config: str | None = Field(None, description="Dataset configuration name, if it has several.")
    hf_data_dir: str | None = Field(None, description="data_dir inside the dataset (e.g. 'harmless-base' for HH).")
    train_split: str = Field("train", description="Split used for training.")
    validation_split: str | None = Field(None, description="Split used for validation; default: carve out validation_fraction.")
    validation_path: str | None = Field(None, description="Local validation file (same format as path).")
    validation_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of the training rows held out when no validation split/file is given."
    )
    max_examples: int | None = Field(None, gt=0, description="Use only the first N training rows (after parsing).")
    max_length: int = Field(256, gt=0, description="Token budget of prompt + response.")
    max_prompt_length: int = Field(128, gt=0, description="Prompts longer than this are cut from the left.")
    prompt_truncation: Literal["left", "error"] = Field(
        "left", description="'left' keeps the end of an over-long prompt; 'error' treats it as a bad row."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="'error' stops at the first bad row, naming it; 'skip' drops bad rows and counts them."
    )
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig, description="Settings of format 'synthetic'.")

    @model_validator(mode="after")
    def _source_and_lengths(self) -> "DataConfig":
        problems: list[tuple[str, str]] = []
        if self.format == "synthetic":
            if self.path or self.hf_dataset:
                problems.append(("path", "format 'synthetic' generates its data; do not set path or hf_dataset"))
        elif (self.path is None) == (self.hf_dataset is None):
            problems.append(("path", f"format {self.format!r} needs exactly one of 'path' and 'hf_dataset'"))
        if self.path and Path(self.path).suffix.lower() not in {".jsonl", ".json", ".parquet", ".csv"}:
            problems.append(("path", f"unsupported file type {Path(self.path).suffix!r}; use .jsonl, .json, .parquet or .csv"))
        if self.max_prompt_length >= self.max_length:
            problems.append(
                ("max_prompt_length", f"must be < max_length={self.max_length} to leave room for a response, got {self.max_prompt_length}")
            )
        if self.validation_split and self.validation_path:
            problems.append(("validation_split", "set at most one of 'validation_split' and 'validation_path'"))
        elif self.validation_split and not self.hf_dataset:
            problems.append(("validation_split", "names a split of hf_dataset; for local files use validation_path"))
        raise_problems(problems)
        return self


class ResourcesPerWorker(Section):
    CPU: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    GPU: float = Field(0.0, ge=0, description="GPUs per training worker (0 = train on CPU with gloo).")


class TrainingConfig(Section):
    stage: Literal["trdpo", "sft"] = Field(
        "trdpo", description="'trdpo': preference optimisation (ref_update none = vanilla DPO); 'sft': NLL on chosen responses."
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the implicit KL to the reference.")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="'sigmoid' is DPO; 'ipo' is Azar et al.'s squared loss.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO label smoothing (sigmoid loss only).")
    average_log_prob: bool | None = Field(
        None,
        description=(
            "Per-token mean log-probs instead of sums. Default (null): per the loss, means for 'ipo' and sums for "
            "'sigmoid', as in TRL; an explicit true/false wins."
        ),
    )
    ref_update: Literal["none", "soft", "hard"] = Field(
        "none", description="How the reference moves: none (vanilla DPO), soft (mix with the policy), hard (copy it)."
    )
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="Soft-update weight: ref <- alpha*policy + (1-alpha)*ref.")
    tau: int | None = Field(None, ge=1, description="Optimizer steps between reference updates (first at step tau).")
    learning_rate: float = Field(1e-6, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup length in optimizer steps.")
    per_device_batch_size: int = Field(4, gt=0, description="Pairs per worker per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run (exclusive with num_epochs).")
    num_epochs: float | None = Field(None, gt=0, description="Passes over the training data (exclusive with max_steps).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (None: no clipping).")
    seed: int = Field(42, description="Seed for data order, dropout and initial weights of tiny models.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto", description="'bf16' autocast (master weights stay fp32); 'auto' = bf16 on GPUs that support it, else fp32."
    )
    num_workers: int = Field(1, gt=0, description="Ray Train workers (FSDP ranks).")
    resources_per_worker: ResourcesPerWorker = Field(default_factory=ResourcesPerWorker, description="Per-worker resources.")
    log_every: int = Field(1, gt=0, description="Report training metrics every N optimizer steps.")
    eval_every: int | None = Field(None, gt=0, description="Validation every N steps against the initial reference (None: at the end only).")
    checkpoint_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (None: at the end only).")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the last K checkpoints.")
    max_failures: int = Field(0, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    defer_gradient_sync: bool = Field(
        True, description="With gradient_accumulation_steps > 1 on several workers, reduce-scatter gradients once per "
        "optimizer step (after the last micro-batch) instead of after each: less communication, but every worker holds "
        "the unsharded gradients between micro-batches (see `trdpo plan`). Same result either way.")
    export_steps: list[int] = Field(
        default_factory=list, description="Also export the policy at these steps (policy-step<N>/ beside policy/), "
        "for evaluations along the way; trdpo run sets it from evaluation.checkpoints.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer block's activations in the backward pass: less memory "
        "(needed for 2.8B+ at length 512), ~30% more compute. `trdpo plan` shows the difference.")
    shard_one_worker: bool = Field(
        False, description="Shard with FSDP2 even on a single worker (a 1-rank device mesh): the multi-worker code "
        "path (DTensor shards, shard-local reference updates, sharded checkpoints) on one device, e.g. to check it on "
        "one GPU (scripts/gpu_check.sh). Slower than the plain single-worker path; needs a process group (torchrun).")
    packing: bool = Field(
        True, description="Micro-batches by token budget, each laid out the cheapest way by an estimate of its FLOPs "
        "(positions x the blocks' cost + attention scores x their cost): the sequences end to end in rows no wider than "
        "needed (positions restarting per sequence, attention never crossing a boundary), or, where that saves under "
        "3% (similar lengths: uniform, TL;DR-like), one sequence per row without a mask. Never more positions or "
        "attention than padding; deterministic, so a resume lays out the same. With flash-attention each micro-batch "
        "is one row of all its sequences. Exact; families not verified exact (see README) fall back to padding, "
        "saying so. false: one right-padded row per sequence with an attention mask (the reference path).")
    max_tokens_per_micro_batch: int | None = Field(
        None, gt=0, description="With packing: a micro-batch holds as many pairs as fit in this many tokens. The "
        "optimizer step still trains per_device_batch_size x workers x gradient_accumulation_steps pairs, cut into as "
        "few micro-batches as fit (the same number on every worker). Default: 2 x per_device_batch_size x "
        "data.max_length, the most a padded micro-batch can hold, so memory never exceeds the padded path's.")
    group_by_length: bool = Field(
        False, description="Put pairs of similar length in the same step (windows of 50 global batches sorted by "
        "length, then the batches shuffled, seeded): less padding without packing, fuller micro-batches with it.")
    logprob_chunk_tokens: int | None = Field(
        1024, gt=0, description="Log-probs (and the validation KL) from this many tokens at a time through the lm_head "
        "and log-softmax, recomputed in the backward: the [tokens, vocab] logits never exist whole, and prompt "
        "positions never reach the lm_head. null: whole logits (the reference path). Families not verified fall back.")

    # What the user set for average_log_prob (None: per the loss). The field itself holds the
    # resolved bool, so code reads ``cfg.average_log_prob`` as a plain flag, while dumps keep the
    # user's setting: a config dumped with loss 'sigmoid' and re-validated with loss 'ipo' (pipeline
    # variants, sweep trials) must switch to means, not carry a resolved ``false`` as if it were chosen.
    _average_log_prob_setting: bool | str | None = PrivateAttr(_UNSET)

    def __setattr__(self, name: str, value) -> None:
        if name != "average_log_prob":
            return super().__setattr__(name, value)
        previous = self._average_log_prob_setting
        self._average_log_prob_setting = value
        try:
            super().__setattr__(name, value)
        except Exception:
            self._average_log_prob_setting = previous
            raise

    @model_validator(mode="after")
    def _resolve_average_log_prob(self) -> "TrainingConfig":
        if self._average_log_prob_setting == _UNSET:  # construction: the field holds what was given
            self._average_log_prob_setting = self.__dict__["average_log_prob"]
        setting = self._average_log_prob_setting
        # Written to __dict__ directly: an assignment here would re-enter validation.
        self.__dict__["average_log_prob"] = self.loss == "ipo" if setting is None else setting
        return self

    @field_serializer("average_log_prob")
    def _dump_average_log_prob(self, value: bool) -> bool | None:
        return None if self._average_log_prob_setting == _UNSET else self._average_log_prob_setting

    @model_validator(mode="after")
    def _update_rule_and_length(self) -> "TrainingConfig":
        problems: list[tuple[str, str]] = []
        if self.ref_update == "soft":
            if self.alpha is None:
                problems.append(("alpha", "required when ref_update is 'soft'"))
            if self.tau is None:
                problems.append(("tau", "required when ref_update is 'soft' (1 = mix after every step)"))
        elif self.ref_update == "hard":
            if self.alpha is not None:
                problems.append(("alpha", f"must not be set when ref_update is 'hard' (it copies the policy), got {self.alpha}"))
            if self.tau is None:
                problems.append(("tau", "required when ref_update is 'hard'"))
        else:
            for name in ("alpha", "tau"):
                if getattr(self, name) is not None:
                    problems.append((name, f"must not be set when ref_update is 'none' (vanilla DPO), got {getattr(self, name)}"))
        if (self.max_steps is None) == (self.num_epochs is None):
            problems.append(("max_steps", "set exactly one of 'max_steps' and 'num_epochs'"))
        if self.label_smoothing and self.loss != "sigmoid":
            problems.append(("label_smoothing", "applies to the sigmoid (DPO) loss only"))
        if self.stage == "sft" and self.ref_update != "none":
            problems.append(("ref_update", "the sft stage has no reference model; use 'none'"))
        if self.max_steps and self.tau and self.tau > self.max_steps:
            problems.append(("tau", f"is larger than max_steps={self.max_steps}: the reference would never move, got {self.tau}"))
        raise_problems(problems)
        return self

    @property
    def ref_update_kwargs(self) -> dict:
        return {"mode": self.ref_update, "alpha": self.alpha, "tau": self.tau}


def model_training_problems(model: ModelConfig, training: TrainingConfig) -> list[tuple[str, str]]:
    """Rules across the ``model`` and ``training`` sections (field paths from the experiment's root)."""
    problems = []
    lora = model.lora
    if lora is not None:
        if lora.base_dtype == "bf16" and training.precision == "fp32":
            problems.append(("model.lora.base_dtype", "a bf16 base computes under bf16 autocast; set training.precision "
                             "to bf16 (or auto on a GPU), or base_dtype fp32"))
        if model.reference_name_or_path:
            problems.append(("model.reference_name_or_path", "LoRA's reference starts as the base itself (adapters off); "
                             "unset it, or train without model.lora"))
    return problems


def training_data_problems(training: TrainingConfig, data: DataConfig) -> list[tuple[str, str]]:
    """Rules across the ``training`` and ``data`` sections (field paths from the experiment's root)."""
    problems = []
    budget = training.max_tokens_per_micro_batch
    pair = data.max_length * (2 if training.stage == "trdpo" else 1)
    if budget is not None and budget < pair:
        problems.append(("training.max_tokens_per_micro_batch",
                         f"must hold the longest pair, {'2 x ' if training.stage == 'trdpo' else ''}data.max_length = {pair} "
                         f"tokens, got {budget}"))
    return problems


@dataclass
class TrainSpec:
    """What a worker needs: the trainers' config sections and where the run lives. It lives here, with
    the configs, because Ray Train's controller unpickles it with every launch: importing the training
    loop there would cost that process a second of CPU for nothing."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    training: TrainingConfig
    run_uri: str  # the run's storage (path or URI): checkpoints under checkpoints/, the policy under policy/
    # Called on rank 0 with every logged step's metrics (the orchestrator passes an MLflow logger:
    # logging straight from rank 0 keeps ray.train.report, a synchronisation point, for the steps
    # that need it: validation and checkpoints).
    step_logger: Callable[[dict], None] | None = None
    # Called on every rank as ``after_step(run_uri, step, rank)`` after each optimizer step: how the
    # fault-tolerance tests kill a worker (tests/fault_injection.py); None in every other run.
    after_step: Callable[[str, int, int], None] | None = None
