"""Per-sequence log-probs (and the validation KL) of a model on a :class:`TokenBatch`.

Two choices, both exact, both on by default where verified:

* **layout** — packed rows (``position_ids``, no padding) or padded rows (``attention_mask``);
* **head** — chunked: the model's output layer is given the hidden states of the positions that
  predict a response token and returns their log-probs, a chunk of tokens at a time
  (:mod:`trainers.trdpo.chunked`), so the ``[tokens, vocab]`` logits never exist whole and prompt
  positions never reach the head; or whole logits from ``model(...).logits``. Where the label
  positions' logits are small (``trainers.trdpo.chunked.scores_whole``: one chunk's worth, or
  under ``WHOLE_LOGITS_BYTES``) the head scores them whole, with no recomputation in the backward;
  prompt positions still never reach it.

The chunked head runs *inside* the model's forward: the forward of the model's own output
embedding (``get_output_embeddings()``) is replaced on this instance. Under FSDP2 the head belongs
to the root unit, whose parameters are all-gathered once for the forward (not once per chunk) and
again for the backward, exactly as for the usual ``lm_head`` call; tied embeddings are the same
parameter either way. Parameter names, the state dict and export are untouched, and with no
request pending the head is the plain linear layer again (generation, the memory probes).

Verified families: the architecture matrix of the tests (GPT-NeoX, Llama, Qwen2, GPT-2, Mistral),
whose causal-LM forward is ``lm_head(hidden_states)`` with nothing after it and whose attention
reads packed-sequence boundaries from ``position_ids``. Other families take the padded layout
and whole logits (each said once) until a test shows them exact.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from trainers.data.batching import LayoutCost, TokenBatch
from trainers.config import TrainingConfig
from trainers.errors import UserFacingError
from trainers.process_group import is_distributed
from trainers.trdpo import IGNORE_INDEX, sequence_logprobs, token_kl
from trainers.trdpo.chunked import linear_token_kl, linear_token_logprobs, scores_whole, sum_by_sequence

VERIFIED_FAMILIES = ("gpt_neox", "llama", "qwen2", "gpt2", "mistral")  # config.model_type


class PackingNotExact(UserFacingError, ValueError):
    """``training.packing: true`` was asked for, and packed scoring is not exact on this install."""


# Two short sequences, packed into one row and scored one at a time: lengths and what a tiny
# instance keeps of the model's config (enough to exercise positions, attention and the head).
CHECK_LENGTHS = (9, 6)
CHECK_LAYERS, CHECK_HEADS, CHECK_HEAD_DIM = 2, 4, 8
# Per-token mean log-probs: fp32 agrees to ~1e-6 here; a packed row whose attention crosses the
# boundary, or whose positions do not restart, is off by 1e-2 or more.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def tiny_instance(config) -> torch.nn.Module:
    """A random 2-layer, narrow model of ``config``'s class: the same attention implementation,
    position scheme and head, a few hundred kilobytes of weights plus its embeddings."""
    import copy

    from transformers import AutoModelForCausalLM

    tiny = copy.deepcopy(config)
    layers = getattr(tiny, "num_hidden_layers", CHECK_LAYERS)
    heads = CHECK_HEADS
    kv_heads = getattr(tiny, "num_key_value_heads", None)
    grouped = kv_heads is not None and kv_heads != getattr(tiny, "num_attention_heads", kv_heads)
    updates = {"num_hidden_layers": min(CHECK_LAYERS, layers), "hidden_size": heads * CHECK_HEAD_DIM,
               "num_attention_heads": heads, "intermediate_size": 2 * heads * CHECK_HEAD_DIM,
               "num_key_value_heads": heads // 2 if grouped else heads, "head_dim": CHECK_HEAD_DIM}
    for name, value in updates.items():
        if name == "num_hidden_layers" or hasattr(tiny, name) and getattr(tiny, name) is not None:
            setattr(tiny, name, value)
    for name, value in list(vars(tiny).items()):  # per-layer settings (layer_types, ...) follow the depth
        if isinstance(value, list) and len(value) == layers and layers > CHECK_LAYERS:
            setattr(tiny, name, value[:CHECK_LAYERS])
    return AutoModelForCausalLM.from_config(tiny)


def packing_error(config, device: torch.device) -> float:
    """How far packed scoring is from scoring one sequence at a time, on a tiny random instance of
    ``config`` on ``device``: the largest difference of a sequence's per-token mean log-prob.

    Packed rows are exact only where transformers reads sequence boundaries from ``position_ids``
    for this model and attention implementation; older versions silently attend across them. The
    global random state is left untouched (training's draws stay the same)."""
    from trainers.data.batching import collate_packed, collate_pairs
    from trainers.data.types import TokenizedPair
    from trainers.model.build import disable_dropout

    implementation = getattr(config, "_attn_implementation", None) or ""
    dtype = torch.bfloat16 if "flash" in implementation else torch.float32  # flash kernels take no fp32
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = tiny_instance(config).to(device).eval()
        disable_dropout(model)
        vocab = min(model.config.vocab_size, 1000)
        ids = torch.randint(0, vocab, (sum(CHECK_LENGTHS) - 3,)).tolist()
    # Two sequences sharing a 3-token prompt: one packed row, against each sequence alone.
    prompt, first, second = ids[:3], ids[3:CHECK_LENGTHS[0]], ids[CHECK_LENGTHS[0]:]
    scorer = Scorer(model, TrainingConfig(max_steps=1, logprob_chunk_tokens=None), bf16=dtype == torch.bfloat16)
    with torch.no_grad():
        batch = collate_packed([TokenizedPair(prompt, first, second, 0)], 0, row_tokens=sum(CHECK_LENGTHS))
        assert batch.input_ids.shape[0] == 1, "the check's two sequences must share a row"
        packed = scorer.sequence_logps(batch.to(device), average=True)[0]
        alone = torch.cat([scorer.sequence_logps(collate_pairs([TokenizedPair(prompt, response, [], 0)], 0,
                                                               chosen_only=True).to(device), average=True)[0]
                           for response in (first, second)])
    return float((packed - alone).abs().max())


def check_packing(model: torch.nn.Module, training: TrainingConfig) -> tuple[TrainingConfig, list[str]]:
    """``training`` with packing off when packed scoring is not exact for ``model``'s config on
    this install (a line saying why); an explicit ``packing: true`` is refused instead."""
    if not training.packing:
        return training, []
    device = next(model.parameters()).device
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    error = packing_error(model.config, device)
    if is_distributed():  # every rank must take the same layout
        import torch.distributed as dist

        agreed = torch.tensor([error], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        error = float(agreed)
    tolerance = CHECK_TOLERANCE[torch.bfloat16 if "flash" in implementation else torch.float32]
    if error <= tolerance:
        return training, []
    import transformers

    why = (f"packed sequences of a {model.config.model_type!r} model ({implementation or 'default'} attention) are not "
           f"scored exactly with transformers {transformers.__version__}: a tiny random instance's log-probs differ "
           f"by {error:.2g} from scoring each sequence alone")
    if "packing" in training.model_fields_set:
        raise PackingNotExact(f"training.packing: {why}; set training.packing: false (or upgrade transformers)")
    return training.model_copy(update={"packing": False}), [f"training.packing: {why}; using padding"]


def resolve_fast_paths(model: torch.nn.Module, training: TrainingConfig) -> tuple[TrainingConfig, list[str]]:
    """``training`` with packing and chunked log-probs switched off where ``model``'s family is not
    verified exact, and packing off where it is verified but its start-up check fails on this
    install (see :func:`check_packing`); a line for each switch."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family in VERIFIED_FAMILIES:
        return check_packing(model, training)
    changes, notes = {}, []
    if training.packing:
        changes["packing"] = False
        notes.append(f"training.packing: model family {family!r} is not verified exact with packed sequences; using padding")
    if training.logprob_chunk_tokens:
        changes["logprob_chunk_tokens"] = None
        notes.append(f"training.logprob_chunk_tokens: model family {family!r} is not verified with the chunked head; "
                     f"using whole logits")
    return training.model_copy(update=changes), notes


@dataclass
class _Positions:
    """The positions of a batch whose next token is a label, flattened in row-major order."""

    mask: torch.Tensor  # [R, L-1] bool
    targets: torch.Tensor  # [N] the label each predicts
    sequence: torch.Tensor  # [N] the sequence it belongs to


def _positions(batch: TokenBatch) -> _Positions:
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return _Positions(mask, targets[mask], batch.sequence_ids[:, 1:][mask])


class ChunkedHead:
    """Takes over the forward of ``model``'s output layer while a request is pending."""

    def __init__(self, model: torch.nn.Module, chunk: int):
        linear = model.get_output_embeddings()
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{type(model).__name__}'s output layer is a {type(linear).__name__}, not a Linear")
        self.linear, self.chunk, self._request = linear, chunk, None
        self._plain_forward = linear.forward
        linear.forward = self._forward
        self.captured: tuple | None = None

    @contextlib.contextmanager
    def request(self, kind: str, positions: _Positions, base: tuple | None = None):
        self._request = (kind, positions, base)
        try:
            yield
        finally:
            self._request = None

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._request is None:
            return self._plain_forward(hidden)
        kind, positions, base = self._request
        selected = hidden[:, :-1][positions.mask]  # [N, H]: only positions that predict a label
        weight, bias = self.linear.weight, self.linear.bias
        if kind == "logps":
            if scores_whole(selected.shape[0], weight.shape[0], self.chunk):  # as the unchunked path, label rows only
                logits = torch.nn.functional.linear(selected, weight, bias).float()
                return logits.gather(-1, positions.targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
            return linear_token_logprobs(selected, weight, bias, positions.targets, self.chunk)
        if kind == "capture":  # validation: keep this model's side for the KL (FSDP frees the gathered weight after)
            self.captured = (weight.detach().clone(), None if bias is None else bias.detach().clone())
            return selected.detach()
        base_hidden, (base_weight, base_bias) = base
        return torch.stack(linear_token_kl(selected, weight, bias, base_hidden, base_weight, base_bias,
                                           positions.targets, self.chunk), -1)


class Scorer:
    """One model's forward on token batches, in the layout and with the head the config says."""

    def __init__(self, model: torch.nn.Module, training: TrainingConfig, bf16: bool):
        self.model, self.bf16 = model, bf16
        self.role = contextlib.nullcontext  # which model of a LoRA run this scores (trainers.model.lora)
        self.head = ChunkedHead(model, training.logprob_chunk_tokens) if training.logprob_chunk_tokens else None
        # What a position and an attention score cost in this model: decides the packed layout.
        self.layout_cost = LayoutCost.for_model(model, whole_logits=self.head is None)

    def as_role(self, role) -> "Scorer":
        """This scorer for another role of the same module (LoRA: another adapter, or none):
        ``role()`` is the context that switches to it. The chunked head is shared (one module)."""
        other = copy.copy(self)
        other.role = role
        return other

    def _forward(self, batch: TokenBatch) -> torch.Tensor:
        with self.role(), torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(**batch.model_inputs(), use_cache=False).logits

    def _token_logps(self, batch: TokenBatch, positions: _Positions) -> torch.Tensor:
        if self.head is not None:
            with self.head.request("logps", positions):
                return self._forward(batch)
        logits = self._forward(batch)[:, :-1][positions.mask].float()
        return logits.gather(-1, positions.targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)

    def sequence_logps(self, batch: TokenBatch, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps, n_tokens)`` per sequence: summed (or per-token mean) log-probs of its response."""
        if self.head is None and not batch.packed:  # whole logits of padded rows: the reference path
            return sequence_logprobs(self._forward(batch), batch.labels, average=average)
        positions = _positions(batch)
        sums = sum_by_sequence(self._token_logps(batch, positions), positions.sequence, batch.num_sequences)
        counts = torch.bincount(positions.sequence, minlength=batch.num_sequences)
        return (sums / counts.clamp(min=1) if average else sums), counts


@torch.no_grad()
def logps_and_kl(policy: Scorer, initial: Scorer, batch: TokenBatch, average: bool):
    """Validation: per sequence, the policy's and the initial model's log-probs, and the summed
    per-token ``KL(policy || initial)`` with its token count (``[S]`` each)."""
    if policy.head is None and not batch.packed:  # the reference path
        logits, base_logits = policy._forward(batch), initial._forward(batch)
        kl, kl_tokens = token_kl(logits, base_logits, batch.labels)
        return (sequence_logprobs(logits, batch.labels, average=average)[0],
                sequence_logprobs(base_logits, batch.labels, average=average)[0], kl, kl_tokens)
    positions = _positions(batch)
    if policy.head is not None:
        with initial.head.request("capture", positions):
            base_hidden = initial._forward(batch)
        with policy.head.request("kl", positions, (base_hidden, initial.head.captured)):
            logp, base_logp, kl = policy._forward(batch).unbind(-1)
        initial.head.captured = None
    else:
        p = torch.log_softmax(policy._forward(batch)[:, :-1][positions.mask].float(), -1)
        q = torch.log_softmax(initial._forward(batch)[:, :-1][positions.mask].float(), -1)
        t = positions.targets[:, None]
        logp, base_logp, kl = p.gather(-1, t).squeeze(-1), q.gather(-1, t).squeeze(-1), (p.exp() * (p - q)).sum(-1)
    s = batch.num_sequences
    counts = torch.bincount(positions.sequence, minlength=s)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        sums = sum_by_sequence(values, positions.sequence, s)
        return sums / counts.clamp(min=1) if average else sums

    return per_sequence(logp), per_sequence(base_logp), sum_by_sequence(kl, positions.sequence, s), counts
