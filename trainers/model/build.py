"""Models and tokenizers: Hugging Face names or local directories, or tiny ones built locally.

The tiny path exists so that tests and the offline demo never download anything: a byte-level
tokenizer (256 byte tokens + pad/bos/eos, with a simple chat template) and a small Llama model
built from :class:`trainers.config.TinyModelConfig`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from trainers.compat import dtype_argument
from trainers.config import ModelConfig, TinyModelConfig, TokenizerConfig
from trainers.state.storage import Storage, is_remote, local_model_dir
from trainers.errors import UserFacingError

BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ModelLoadError(UserFacingError, ValueError):
    """A model or tokenizer that cannot be loaded; the message names the config field."""


def make_byte_tokenizer():
    """A byte-level tokenizer built in memory: any text round-trips, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*BYTE_SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def make_word_tokenizer(vocab_size: int):
    """One token per whitespace-separated word ``w<id>`` (ids 0-3: pad, BOS, EOS, unknown), built in
    memory: any vocabulary size without a download, for benchmarks at a real model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + [f"w{i}" for i in range(len(special), vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def build_tokenizer(model_cfg: ModelConfig, tokenizer_cfg: TokenizerConfig):
    if tokenizer_cfg.kind == "byte":
        tokenizer = make_byte_tokenizer()
    else:
        name = tokenizer_cfg.name_or_path or model_cfg.name_or_path
        if name is None:
            raise ModelLoadError("tokenizer.kind: a tiny model has no pretrained tokenizer; use kind 'byte' or set tokenizer.name_or_path")
        name = local_model_dir(name, weights=False)
        if _looks_local(name) and not Path(name).expanduser().exists():
            raise ModelLoadError(f"tokenizer.name_or_path: {name!r} does not exist")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"tokenizer {name!r}: cannot load ({exc})") from exc
    if tokenizer_cfg.chat_template:
        tokenizer.chat_template = tokenizer_cfg.chat_template
    if tokenizer.pad_token_id is None:
        # Decoder-only tokenizers often lack a pad token; padding is masked out everywhere.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model_config(cfg: TinyModelConfig, vocab_size: int, pad_token_id: int | None = None,
                      attn_implementation: str | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        attn_implementation=attn_implementation,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=pad_token_id,
    )


def build_tiny_model(cfg: TinyModelConfig, vocab_size: int, pad_token_id: int | None = None,
                     attn_implementation: str | None = None):
    from transformers import LlamaForCausalLM

    config = tiny_model_config(cfg, vocab_size, pad_token_id, attn_implementation)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights wherever it is built
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def architecture_config(model_cfg: ModelConfig, tokenizer, name_or_path: str | None = None):
    """The model's Hugging Face config (``config.json`` only, no weights)."""
    if model_cfg.tiny is not None and name_or_path is None:
        return tiny_model_config(model_cfg.tiny, len(tokenizer), tokenizer.pad_token_id, model_cfg.attn_implementation)
    from transformers import AutoConfig

    name = local_model_dir(name_or_path or model_cfg.name_or_path, weights=False)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
                                          **attention_argument(model_cfg))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.name_or_path: cannot read the config of {name!r} ({exc})") from exc


def model_skeleton(model_cfg: ModelConfig, tokenizer, name_or_path: str | None = None):
    """The model's modules with every tensor on the meta device: shapes and names, no memory."""
    from transformers import AutoModelForCausalLM

    config = architecture_config(model_cfg, tokenizer, name_or_path)
    with torch.device("meta"), attention_available(model_cfg):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code,
                                                 **dtype_argument(torch.float32))


def load_pretrained(name: str, field: str, model_cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    name = local_model_dir(name)
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"{field}: {name!r} does not exist")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per worker per load: noise in the driver's console
    try:
        with attention_available(model_cfg):
            return AutoModelForCausalLM.from_pretrained(
                name, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision, **dtype_argument(dtype),
                **attention_argument(model_cfg))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot load {name!r} ({exc})") from exc


def attention_argument(model_cfg: ModelConfig) -> dict:
    """``attn_implementation=`` for transformers where the config names one (else transformers' default)."""
    return {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}


@contextlib.contextmanager
def attention_available(model_cfg: ModelConfig):
    """transformers refuses an attention kernel it cannot run (flash-attn not installed, no GPU)
    with an ImportError: one line naming the field instead."""
    try:
        yield
    except ImportError as exc:
        if not model_cfg.attn_implementation:
            raise
        raise ModelLoadError(f"model.attn_implementation: {model_cfg.attn_implementation!r} is not available here "
                             f"({exc})") from exc


DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def dropout_sites(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str]]:
    """Every dropout probability of ``model`` as ``(holder, attribute)``. Two kinds exist: dropout
    modules (``p``: GPT-2's residual and attention dropout, PEFT's adapter dropout), and
    probabilities that attention layers keep as plain floats and hand to the attention kernel
    (``attention_dropout`` in Llama, Qwen2, Mistral and GPT-NeoX). TRL's ``disable_dropout_in_model``
    zeroes only the first kind; a train-mode forward equals the eval-mode one only with both off."""
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            yield module, "p"
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                yield module, name


def disable_dropout(model: torch.nn.Module) -> int:
    """Every dropout of ``model`` off, in training mode too; returns how many were on. The model's
    config is left as it is (an export keeps the model's settings)."""
    switched = 0
    for holder, name in list(dropout_sites(model)):
        switched += getattr(holder, name) > 0
        setattr(holder, name, 0.0)
    return switched


def build_policy(model_cfg: ModelConfig, tokenizer):
    """The policy's initial weights, in float32 (the master dtype; autocast handles bf16)."""
    if model_cfg.tiny is not None:
        with attention_available(model_cfg):
            return build_tiny_model(model_cfg.tiny, len(tokenizer), tokenizer.pad_token_id, model_cfg.attn_implementation)
    return load_pretrained(model_cfg.name_or_path, "model.name_or_path", model_cfg)


def check_model_source(model_cfg: ModelConfig) -> None:
    """Fail early (before any worker starts) on local model paths that do not exist."""
    for field, name in (("model.name_or_path", model_cfg.name_or_path), ("model.reference_name_or_path", model_cfg.reference_name_or_path)):
        if name and is_remote(name):
            if not Storage(name).exists("config.json"):
                raise ModelLoadError(f"{field}: {name!r} is not a model directory (no config.json)")
        elif name and _looks_local(name) and not (Path(name).expanduser() / "config.json").is_file():
            raise ModelLoadError(f"{field}: {name!r} is not a model directory (no config.json)")
