"""Schema of the ``evaluation`` section (owned here, composed by orchestrator.config).

Judge API keys never live in a config: ``api_key_env`` names the environment variable that holds
the key, so configs, MLflow params and logs can be shared freely.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from trainers.config import Section, config_problems

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SamplingConfig(Section):
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(64, gt=0, description="Longest response to generate.")
    num_samples: int = Field(1, gt=0, description="Samples per prompt.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    seed: int = Field(0, description="Seed: the same seed, model and prompts give the same samples.")


class JudgeConfig(Section):
    backend: Literal["openai", "hf", "reward_model", "python"] = Field(
        "python",
        description="'openai': any OpenAI-compatible chat endpoint; 'hf': a local causal LM; "
        "'reward_model': a local sequence classifier; 'python': a module:function scorer.",
    )
    model: str | None = Field(None, description="Judge model name (openai) or local path/name (hf, reward_model).")
    base_url: str | None = Field(None, description="Endpoint of an OpenAI-compatible server (vLLM, TGI, ...).")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key.")
    function: str | None = Field(None, description="'module:function' gold scorer for the python backend.")
    template: str = Field("hh", description="Prompt template: hh, tldr, or a criterion name.")
    both_orders: bool = Field(True, description="Judge A/B and B/A; disagreement counts as a tie.")
    concurrency: int = Field(4, gt=0, description="Concurrent judge requests per pool.")
    requests_per_second: float | None = Field(None, gt=0, description="Rate limit for the whole pool.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts, exponential backoff with jitter.")

    @model_validator(mode="after")
    def _backend_fields(self) -> "JudgeConfig":
        if self.backend == "python" and not (self.function and ":" in self.function):
            raise config_problems(("function", "the python judge needs 'module:function'"))
        if self.backend in {"openai", "hf", "reward_model"} and not self.model:
            raise config_problems(("model", f"the {self.backend} judge needs a model"))
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise config_problems(("api_key_env", "must be the NAME of an environment variable, not a key"))
        return self


class ModelRef(Section):
    """A model to sample from: a Hugging Face directory or name, or a training run's exported policy."""

    name: str = Field(description="Label used in tables and plots.")
    path: str | None = Field(None, description="HF model directory or Hub name.")
    mlflow_run_id: str | None = Field(None, description="MLflow training run whose 'policy' artifact is the model.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelRef":
        if (self.path is None) == (self.mlflow_run_id is None):
            raise config_problems(("path", "set exactly one of 'path' and 'mlflow_run_id'"))
        return self


CRITERIA = ("coherence", "correctness", "level_of_detail", "helpfulness", "harmlessness")


class EvaluationConfig(Section):
    enabled: bool = Field(False, description="Run generation and judging after training.")
    policies: list[ModelRef] = Field(default_factory=list, description="Models to evaluate (trdpo eval); the pipeline fills in its trained policies.")
    baseline: ModelRef | None = Field(None, description="What the policies are compared with (e.g. the SFT model).")
    num_prompts: int = Field(64, gt=0, description="Held-out prompts to evaluate on.")
    prompts_path: str | None = Field(None, description="A JSONL file of {'prompt': ...} rows instead of the held-out split.")
    criteria: list[str] = Field(default_factory=list, description=f"Human-centric criteria, from {list(CRITERIA)}.")
    criteria_mode: Literal["pairwise", "score"] = Field(
        "pairwise", description="Per-criterion pairwise verdicts, or 1-10 scores of each response (openai judge)."
    )
    cache_path: str | None = Field(
        None, description="SQLite judgment cache shared by the judge actors; default: judgments.sqlite in tracking.output_dir. "
        "An object-store URI (s3://...) works: a local copy is used and written back after each evaluation.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Generation settings.")
    judge: JudgeConfig = Field(
        default_factory=lambda: JudgeConfig(backend="python", function="trainers.data.synthetic:gold_reward"),
        description="Who decides which response is better.",
    )
    num_generation_actors: int = Field(1, gt=0, description="Generation actors in the pool.")
    num_judge_actors: int = Field(1, gt=0, description="Judge actors in the pool.")
    bootstrap_resamples: int = Field(1000, ge=100, description="Resamples for the bootstrap CIs of the win rate and the length-controlled win rate.")
    checkpoints: int | list[int] | None = Field(
        None, description="Also evaluate policies along the way (trdpo run): every N optimizer steps, or at the listed steps. "
        "Each is judged against the starting model and gets a sampled KL from it, so each variant draws a quality-vs-KL curve.")
    kl_samples: int = Field(2, gt=0, description="Samples per prompt for the sampled KL from the starting model (temperature 1).")

    def checkpoint_steps(self, max_steps: int) -> list[int]:
        """The steps evaluated along the way, before the final one (which is always evaluated)."""
        if self.checkpoints is None:
            return []
        steps = range(self.checkpoints, max_steps, self.checkpoints) if isinstance(self.checkpoints, int) else self.checkpoints
        return sorted({s for s in steps if 0 < s < max_steps})

    @model_validator(mode="after")
    def _criteria_known(self) -> "EvaluationConfig":
        unknown = [c for c in self.criteria if c not in CRITERIA]
        if unknown:
            raise config_problems(("criteria", f"unknown {unknown}; choose from {list(CRITERIA)}"))
        if self.criteria and self.judge.backend not in ("openai", "hf"):
            raise config_problems(("criteria", f"per-criterion verdicts need a pairwise judge (openai or hf), not {self.judge.backend!r}"))
        if isinstance(self.checkpoints, int) and self.checkpoints <= 0:
            raise config_problems(("checkpoints", f"every N steps needs N > 0, got {self.checkpoints}"))
        if isinstance(self.checkpoints, list) and any(s <= 0 for s in self.checkpoints):
            raise config_problems(("checkpoints", f"steps must be > 0, got {self.checkpoints}"))
        if self.criteria and self.criteria_mode == "score" and self.judge.backend != "openai":
            raise config_problems(("criteria_mode", f"1-10 scores need the openai judge, not {self.judge.backend!r}"))
        return self
