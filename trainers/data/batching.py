"""From tokenized pairs to the tensors of one forward: data order, micro-batches, collation.

    epoch order (seed, epoch)  ──►  the step's global batch: G = per_device_batch_size x workers x
      │                             gradient_accumulation_steps pairs (a pure function of the step)
      ├─ padded (training.packing: false): micro-batch m of rank r = pairs [(m*world + r)*B, +B),
      │     each sequence its own row, right-padded to the longest (the reference path)
      └─ packed (default): the G pairs split into world x k micro-batches of at most
            training.max_tokens_per_micro_batch tokens (k the fewest that fit, the same on every
            rank, balanced by longest-first greedy); in each, the cheapest layout by estimated
            FLOPs (``LayoutCost``): the sequences laid end to end in rows (positions restarting
            at 0 per sequence), or one sequence per row where packing saves nothing

An optimizer step always means the same G pairs, however they are cut into micro-batches, so
β, the loss scale (each pair weighs 1/G), the learning-rate schedule, τ and resume keep their
meaning. Sequence ``s`` of a batch of ``P`` pairs is pair ``s``'s chosen response for ``s < P``
and pair ``s - P``'s rejected one after (SFT batches hold the chosen ones only).

Packed rows need no attention mask: Hugging Face models read sequence boundaries from the
``position_ids`` (a position that does not follow its predecessor starts a new sequence), and give
attention kernels a block-diagonal causal mask (SDPA/eager) or ``cu_seq_lens`` (flash-attention).
The padding that ends a row gets positions 0, 1, ... of its own, so it is a segment of its own too,
which no real token attends to.

Choosing the layout. SDPA and eager attention compute the whole square of every row, block-diagonal
mask or not (measured on CPU: a masked row costs what an unmasked one does), and every row is
padded to the widest. A layout of R rows of width W costs about

    R x W x per_position  +  R x W^2 x per_score

FLOPs, ``per_position`` the blocks' matmuls (2 x their parameters; the lm_head too when every
position reaches it) and ``per_score`` the attention's QK^T and AV (4 x heads x head_dim per
block). Rows packed no longer than the micro-batch's longest sequence never cost more than one
sequence per row: R <= S rows, W <= the longest. The candidates are one sequence per row and
first-fit-decreasing rows of capacity the longest sequence, 1.25x that, ... up to max_length;
a candidate computing more positions or more attention than one sequence per row is out; the
cheapest left wins, and packing must save ``MIN_PACKING_SAVING`` of the cost or the rows stay one
sequence each, right-padded, with no attention mask at all: causally, a real token never sees the
padding after it, and SDPA takes its ``is_causal`` kernel. With flash-attention
(``model.attn_implementation: flash_attention_2``) a packed row costs each sequence's own
triangle, so the micro-batch becomes one row of all its sequences: no padding at all, and
transformers passes flash-attention's variable-length kernel the boundaries it reads from
``position_ids`` only for a batch of one row (with several rows it would attend across them). The
choice is a pure function of the lengths and the model's config: a resumed run lays out every
micro-batch as before.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from trainers.config import TrainingConfig
from trainers.data.types import DataError, TokenizedPair
from trainers.trdpo import IGNORE_INDEX


@dataclass
class TokenBatch:
    """Sequences laid out in rows for one forward.

    ``labels`` holds the token a position *is* on response tokens (``IGNORE_INDEX`` on prompts,
    padding and the first token of every sequence); logits at ``t`` predict ``labels[t + 1]``.
    ``sequence_ids`` says which sequence each token belongs to (-1 on padding). A padded batch has
    an ``attention_mask`` and one sequence per row; a packed one has ``position_ids`` instead."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    sequence_ids: torch.Tensor
    num_sequences: int
    num_pairs: int
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    estimate: "LayoutEstimate | None" = None  # the cost model's FLOPs for this layout (default path only)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_tokens(self) -> int:
        """Real tokens (padding excluded)."""
        return int((self.sequence_ids >= 0).sum())

    @property
    def num_slots(self) -> int:
        """Positions the forward computes, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "TokenBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return TokenBatch(move(self.input_ids), move(self.labels), move(self.sequence_ids), self.num_sequences,
                          self.num_pairs, move(self.attention_mask), move(self.position_ids), self.estimate)

    def model_inputs(self) -> dict:
        if self.packed:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is None:  # one right-padded sequence per row: causal attention alone is exact
            return {"input_ids": self.input_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _sequences(pairs: list[TokenizedPair], chosen_only: bool) -> list[tuple[list[int], list[int]]]:
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    if not chosen_only:
        sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return sequences


def pair_tokens(pair: TokenizedPair, chosen_only: bool = False) -> int:
    """Tokens a pair adds to a packed micro-batch (both of its sequences, or the chosen one)."""
    chosen = len(pair.prompt_ids) + len(pair.chosen_ids)
    return chosen if chosen_only else chosen + len(pair.prompt_ids) + len(pair.rejected_ids)


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, chosen_only: bool = False, mask: bool = True) -> TokenBatch:
    """Padded layout: one sequence per row (row i is sequence i), right-padded to the longest.
    ``mask=False``: no attention mask (causal attention keeps every real token off the padding
    after it; the padding positions' outputs are never read)."""
    sequences = _sequences(pairs, chosen_only)
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full((len(sequences), width), -1, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        labels[i, max(n_prompt, 1):n] = torch.tensor(response[max(0, 1 - n_prompt):])
        sequence_ids[i, :n] = i
        attention_mask[i, :n] = 1
    return TokenBatch(input_ids, labels, sequence_ids, len(sequences), len(pairs),
                      attention_mask=attention_mask if mask else None)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into as few rows of at most ``capacity`` as first-fit
    decreasing finds (within 11/9 of the optimum), longest first, ties by index."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than a row's {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int, row_tokens: int, chosen_only: bool = False,
                   rows: list[list[int]] | None = None) -> TokenBatch:
    """Packed layout: sequences end to end in rows of at most ``row_tokens`` (or in the given
    ``rows`` of sequence indices), positions restarting at 0 for each; the rows right-padded to the
    longest with a padding segment of their own."""
    sequences = _sequences(pairs, chosen_only)
    lengths = [len(prompt) + len(response) for prompt, response in sequences]
    rows = rows if rows is not None else first_fit_decreasing(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s in sorted(row):  # in sequence order within the row: the layout reads naturally
            prompt, response = sequences[s]
            n = lengths[s]
            input_ids[r, start:start + n] = torch.tensor(prompt + response)
            # The first token of a sequence is never a label: nothing inside its sequence predicts it
            # (a label there would be predicted by the previous sequence's last token).
            first = max(len(prompt), 1)
            labels[r, start + first:start + n] = torch.tensor((prompt + response)[first:])
            sequence_ids[r, start:start + n] = s
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)
    return TokenBatch(input_ids, labels, sequence_ids, len(sequences), len(pairs), position_ids=position_ids)


# ------------------------------------------------------------------------------ layout by cost


MIN_PACKING_SAVING = 0.03  # packing must save this share of the estimate: the masked path is not free
CAPACITY_STEP = 1.25  # packed row capacities tried: the longest sequence, x 1.25, x 1.25^2, ..., max_length


@dataclass(frozen=True)
class LayoutEstimate:
    """Estimated FLOPs of one forward over a layout."""

    positions: float  # rows x width x per_position
    attention: float  # attention scores x per_score

    @property
    def total(self) -> float:
        return self.positions + self.attention


@dataclass(frozen=True)
class LayoutCost:
    """FLOPs per computed position and per attention score of a model's forward (the backward
    scales both alike, so only their ratio decides a layout)."""

    per_position: float
    per_score: float
    per_sequence_attention: bool = False  # flash-attention varlen: each sequence's own causal triangle

    @classmethod
    def for_model(cls, model: torch.nn.Module, whole_logits: bool) -> "LayoutCost":
        """From ``model``'s parameters and config: the blocks' matmuls cost 2 FLOPs per parameter
        and position (embeddings do no matmul); the lm_head's too when ``whole_logits`` (every
        position reaches it; the chunked head sees only label positions, the same in any layout).
        Attention: QK^T and AV, 2 x 2 x heads x head_dim FLOPs per score and block."""
        config = model.config
        # Read from the parameters and the config only: under FSDP the block classes are wrapped.
        # Parameter counts are global (a DTensor's numel is the whole tensor's).
        head = model.get_output_embeddings()
        embeddings = {id(p) for module in (model.get_input_embeddings(), head) for p in module.parameters()}
        embeddings |= {id(p) for name, p in model.named_parameters() if "wpe" in name or "position_embed" in name}
        body = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embeddings)
        per_position = 2.0 * body + (2.0 * head.weight.numel() if whole_logits else 0.0)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
        per_score = 4.0 * heads * head_dim * layers
        flash = "flash" in str(getattr(config, "_attn_implementation", "") or "")  # flash_attention_2/3, hub kernels
        return cls(per_position, per_score, flash)

    def estimate(self, lengths: list[int], rows: list[list[int]]) -> LayoutEstimate:
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.per_sequence_attention:
            def triangle(n: int) -> float:
                return n * (n + 1) / 2

            if len(rows) == len(lengths):  # one sequence per row, no position restart: causal over the padding too
                scores = len(rows) * triangle(width)
            else:  # varlen: each sequence's own triangle, and the row's padding segment its own
                scores = sum(sum(triangle(lengths[i]) for i in row) + triangle(width - sum(lengths[i] for i in row))
                             for row in rows)
        else:  # SDPA / eager: every row's whole square, rows padded to the widest
            scores = len(rows) * width * width
        return LayoutEstimate(len(rows) * width * self.per_position, scores * self.per_score)


# Without a model (the memory planner's data scan): the ratio of a mid-size decoder (hidden 1024,
# 12 h^2 parameters per block): per_score / per_position = 1 / (6 x hidden).
GENERIC_LAYOUT_COST = LayoutCost(per_position=24.0 * 1024**2, per_score=4.0 * 1024)


def choose_rows(lengths: list[int], max_length: int, cost: LayoutCost) -> tuple[list[list[int]] | None, LayoutEstimate]:
    """The cheapest layout of sequences of ``lengths``: packed rows (lists of sequence indices), or
    None for one sequence per row; and its estimate. Deterministic in its inputs."""
    singles = [[i] for i in range(len(lengths))]
    padded = cost.estimate(lengths, singles)
    if cost.per_sequence_attention:  # varlen attention: one row of every sequence (see the module docstring)
        row = [list(range(len(lengths)))]
        estimate = cost.estimate(lengths, row)
        if len(lengths) > 1 and estimate.total <= (1 - MIN_PACKING_SAVING) * padded.total:
            return row, estimate
        return None, padded
    longest = max(lengths)
    capacities, capacity = [], float(longest)
    while capacity < max_length:
        capacities.append(int(capacity))
        capacity *= CAPACITY_STEP
    capacities.append(max(longest, max_length))
    best, best_estimate = None, padded
    for capacity in dict.fromkeys(capacities):
        rows = first_fit_decreasing(lengths, capacity)
        if len(rows) == len(lengths):
            continue  # one sequence per row anyway
        estimate = cost.estimate(lengths, rows)
        if estimate.positions > padded.positions or estimate.attention > padded.attention:
            continue  # never more positions or attention than padding, whatever the coefficients say
        if estimate.total < best_estimate.total:
            best, best_estimate = rows, estimate
    if best is not None and best_estimate.total > (1 - MIN_PACKING_SAVING) * padded.total:
        return None, padded
    return best, best_estimate


def collate_by_cost(pairs: list[TokenizedPair], pad_token_id: int, max_length: int, cost: LayoutCost,
                    chosen_only: bool = False) -> TokenBatch:
    """The default layout: whichever of packed rows or one unmasked sequence per row the cost
    model finds cheaper (see the module docstring)."""
    lengths = [len(prompt) + len(response) for prompt, response in _sequences(pairs, chosen_only)]
    rows, estimate = choose_rows(lengths, max_length, cost)
    if rows is None:
        batch = collate_pairs(pairs, pad_token_id, chosen_only, mask=False)
    else:
        batch = collate_packed(pairs, pad_token_id, max_length, chosen_only, rows=rows)
    batch.estimate = estimate
    return batch


# ------------------------------------------------------------------------------- micro-batches


@dataclass
class MicroBatch:
    pairs: list[TokenizedPair]
    weights: torch.Tensor  # per pair: 1.0, or 0.0 for a stand-in that only keeps collectives in step


def balanced_bins(sizes: list[int], world: int, budget: int) -> list[list[int]]:
    """Item indices in ``world * k`` bins of at most ``budget`` each, ``k`` the smallest for which
    longest-first greedy (each item into the least-loaded bin) fits; bin ``j * world + r`` is
    rank ``r``'s ``j``-th. Items keep their order inside a bin."""
    if not sizes:
        return [[] for _ in range(world)]
    if max(sizes) > budget:
        raise ValueError(f"an item of {max(sizes)} exceeds the budget of {budget}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    k = max(1, math.ceil(sum(sizes) / (world * budget)))
    while True:
        bins: list[list[int]] = [[] for _ in range(world * k)]
        loads = [(0, b) for b in range(world * k)]  # a heap: the least-loaded bin first
        for i in order:
            load, b = loads[0]
            if load + sizes[i] > budget:  # the least-loaded bin is full: so is every other
                break
            bins[b].append(i)
            heapq.heapreplace(loads, (load + sizes[i], b))
        else:
            return [sorted(b) for b in bins]
        k += 1


def packed_micro_batches(pairs: list[TokenizedPair], budget: int, rank: int, world: int, chosen_only: bool) -> list[MicroBatch]:
    """This rank's share of ``pairs`` in token-budget micro-batches; every rank gets as many."""
    bins = balanced_bins([pair_tokens(p, chosen_only) for p in pairs], world, budget)
    stand_in = min(pairs, key=lambda p: pair_tokens(p, chosen_only)) if pairs else None
    batches = []
    for members in bins[rank::world]:
        if members:
            batches.append(MicroBatch([pairs[i] for i in members], torch.ones(len(members))))
        else:  # this rank ran out: a zero-weight stand-in keeps the collective forward in step
            batches.append(MicroBatch([stand_in], torch.zeros(1)))
    return batches


def micro_batch_budget(training: TrainingConfig, max_length: int) -> int:
    """``training.max_tokens_per_micro_batch``, or by default what a padded micro-batch of
    ``per_device_batch_size`` pairs could hold at most (so a packed step never needs more memory)."""
    sequences = 2 if training.stage == "trdpo" else 1  # SFT scores the chosen responses only
    return training.max_tokens_per_micro_batch or sequences * training.per_device_batch_size * max_length


class DataOrder:
    """Which pairs each optimizer step trains on: a pure function of (seed, step), so a resumed
    run, or one on another number of workers with the same global batch, sees the same pairs.

    Epoch ``e`` is a permutation seeded by ``seed + e``. With ``training.group_by_length`` pairs
    of similar length share a step: each window of 50 global batches is sorted by length and cut
    into global batches, and those are shuffled (seeded) so the steps do not go from long to short."""

    GROUP_WINDOW = 50  # global batches sorted together (Hugging Face's LengthGroupedSampler uses 50 too)

    def __init__(self, pairs: list[TokenizedPair], training: TrainingConfig, world: int, chosen_only: bool = False,
                 max_length: int | None = None):
        self.pairs, self.training, self.world, self.chosen_only = pairs, training, world, chosen_only
        self.global_batch = training.per_device_batch_size * world * training.gradient_accumulation_steps
        self.steps_per_epoch = len(pairs) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(pairs)} training pairs are fewer than one global batch of {self.global_batch} "
                            f"(training.per_device_batch_size x workers x gradient_accumulation_steps)")
        budget = micro_batch_budget(training, max_length) if max_length else None
        longest = max(pair_tokens(p, chosen_only) for p in pairs) if budget else 0
        if training.packing and budget and longest > budget:  # the experiment's validation says so too; torchrun skips it
            raise DataError(f"training.max_tokens_per_micro_batch: {budget} tokens cannot hold a pair of {longest}; "
                            f"set it to at least {longest} (2 x data.max_length holds any pair)")
        self._lengths = [pair_tokens(p, chosen_only) for p in pairs] if training.group_by_length else None
        self._epochs: dict[int, tuple[int, ...]] = {}

    def epoch(self, epoch: int) -> tuple[int, ...]:
        if epoch not in self._epochs:  # computed once per epoch, not once per step
            self._epochs = {epoch: self._epoch_order(epoch)}
        return self._epochs[epoch]

    def _epoch_order(self, epoch: int) -> tuple[int, ...]:
        generator = torch.Generator().manual_seed(self.training.seed + epoch)
        order = torch.randperm(len(self.pairs), generator=generator).tolist()
        if self._lengths is None:
            return tuple(order)
        g, window = self.global_batch, self.global_batch * self.GROUP_WINDOW
        used = self.steps_per_epoch * g  # the tail that makes no whole step is left out, as without grouping
        batches = []
        for start in range(0, used, window):
            chunk = sorted(order[start:min(start + window, used)], key=lambda i: -self._lengths[i])
            batches += [chunk[i:i + g] for i in range(0, len(chunk), g)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return tuple(i for b in shuffled for i in batches[b]) + tuple(order[used:])

    def step_pairs(self, step: int) -> list[TokenizedPair]:
        """The global batch of optimizer step ``step`` (1-based)."""
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        order = self.epoch(epoch)
        return [self.pairs[i] for i in order[position * self.global_batch:(position + 1) * self.global_batch]]

    def micro_batches(self, step: int, rank: int, max_length: int, training: TrainingConfig | None = None) -> list[MicroBatch]:
        """This rank's micro-batches of ``step``: as many on every rank. ``training`` (default: the
        order's own) decides the layout: the loop passes its settings after the model family's
        fast paths are resolved."""
        pairs, t = self.step_pairs(step), training or self.training
        if t.packing:
            return packed_micro_batches(pairs, micro_batch_budget(t, max_length), rank, self.world, self.chosen_only)
        b = t.per_device_batch_size
        return [MicroBatch(pairs[(m * self.world + rank) * b:(m * self.world + rank + 1) * b], torch.ones(b))
                for m in range(t.gradient_accumulation_steps)]

    def total_steps(self) -> int:
        t = self.training
        return t.max_steps or max(1, math.ceil(t.num_epochs * self.steps_per_epoch))


def validation_micro_batches(pairs: list[TokenizedPair], training: TrainingConfig, max_length: int, rank: int, world: int,
                             chosen_only: bool = False) -> list[MicroBatch]:
    """This rank's validation micro-batches, as many on every rank (each forward is a collective
    under FSDP). Packed: token-budget bins over all pairs. Padded: rank ``r`` takes pairs
    ``r, r + world, ...`` in chunks of ``per_device_batch_size``; a rank that runs out gets a
    zero-weight stand-in."""
    if not pairs:
        return []
    if training.packing:
        return packed_micro_batches(pairs, micro_batch_budget(training, max_length), rank, world, chosen_only)
    mine, per_rank, size = pairs[rank::world], -(-len(pairs) // world), training.per_device_batch_size
    batches = []
    for start in range(0, per_rank, size):
        real = mine[start:start + size]
        batches.append(MicroBatch(real, torch.ones(len(real))) if real else MicroBatch([pairs[0]], torch.zeros(1)))
    return batches


def collate(batch: MicroBatch | list[TokenizedPair], pad_token_id: int, training: TrainingConfig, max_length: int,
            chosen_only: bool = False, cost: LayoutCost | None = None) -> TokenBatch:
    """The layout the config asks for: with packing, the cheapest by ``cost`` (the model's; a
    generic decoder's without one); else padded rows with an attention mask (the reference path)."""
    pairs = batch.pairs if isinstance(batch, MicroBatch) else batch
    if training.packing:
        return collate_by_cost(pairs, pad_token_id, max_length, cost or GENERIC_LAYOUT_COST, chosen_only)
    return collate_pairs(pairs, pad_token_id, chosen_only)
