"""Data order, token-budget micro-batches and packed rows (trainers.data.batching), and packed
forwards that equal one-sequence-at-a-time forwards for every verified family (trainers.model.scoring)."""

import random

import pytest
import torch

from trainers.data.batching import (DataOrder, balanced_bins, collate_packed, collate_pairs, first_fit_decreasing,
                               micro_batch_budget, pair_tokens, validation_micro_batches)
from trainers.config import TrainingConfig
from trainers.data.types import TokenizedPair
from trainers.fsdp_check import FAMILIES, tiny_family_config
from trainers.model.scoring import Scorer, logps_and_kl, resolve_fast_paths
from trainers.trdpo import IGNORE_INDEX

PAD = 0


def random_pairs(n: int, seed: int = 0, longest: int = 40) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(k)]

    # Long-tailed: mostly short, a few near the limit.
    def length(limit: int) -> int:
        return max(1, min(limit, int(rng.lognormvariate(1.8, 0.8))))

    pairs = []
    for row in range(n):
        prompt = ids(length(longest // 2))
        budget = longest - len(prompt)
        pairs.append(TokenizedPair(prompt, ids(length(budget)), ids(length(budget)), row))
    return pairs


def training(**kw) -> TrainingConfig:
    kw.setdefault("max_steps", 10)
    return TrainingConfig(**kw)


# ---------------------------------------------------------------------------------------- layout


def test_first_fit_decreasing_fills_rows_within_capacity():
    lengths = [5, 9, 1, 7, 3, 4, 1]
    rows = first_fit_decreasing(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10 with no room left: {9, 1}, {7, 3}, {5, 4, 1}
    with pytest.raises(ValueError, match="more than a row"):
        first_fit_decreasing([11], capacity=10)


def test_packed_rows_restart_positions_and_keep_labels_inside_each_sequence():
    pairs = [TokenizedPair([11, 12], [21, 22, 23], [31], 1), TokenizedPair([41, 42, 43], [51], [61, 62], 2)]
    batch = collate_packed(pairs, PAD, row_tokens=8)
    # Four sequences of 5, 4, 3, 5 tokens (17) in rows of 8: FFD gives [5+3], [5], [4] -> 3 rows of width 8.
    assert batch.input_ids.shape == (3, 8) and batch.packed and batch.attention_mask is None
    assert batch.num_sequences == 4 and batch.num_pairs == 2 and batch.num_tokens == 17 and batch.num_slots == 24
    for r in range(3):
        ids, labels, seqs, pos = (t[r].tolist() for t in (batch.input_ids, batch.labels, batch.sequence_ids, batch.position_ids))
        start = 0
        while start < 8 and seqs[start] >= 0:
            s = seqs[start]
            n = seqs.count(s)
            assert pos[start:start + n] == list(range(n))  # positions restart at every sequence
            pair, which = pairs[s % 2], ("chosen", "rejected")[s // 2]
            response = pair.chosen_ids if which == "chosen" else pair.rejected_ids
            assert ids[start:start + n] == pair.prompt_ids + response
            assert labels[start:start + n] == [IGNORE_INDEX] * len(pair.prompt_ids) + response
            start += n
        # The padding that ends a row is a segment of its own (positions from 0), never a label.
        assert pos[start:] == list(range(8 - start)) and set(labels[start:]) <= {IGNORE_INDEX}
        assert set(ids[start:]) <= {PAD}


def test_the_first_token_of_a_sequence_is_never_a_label_even_without_a_prompt():
    # Otherwise the previous sequence's last token would be scored as predicting it.
    pairs = [TokenizedPair([], [21, 22], [31, 32, 33], 1)]
    packed = collate_packed(pairs, PAD, row_tokens=8)
    assert packed.input_ids.shape == (1, 5)
    assert packed.labels[0].tolist() == [IGNORE_INDEX, 22, IGNORE_INDEX, 32, 33]


# ------------------------------------------------------------------------------------ micro-batches


@pytest.mark.parametrize("world", [1, 2, 3])
def test_balanced_bins_give_every_rank_the_same_count_within_budget(world):
    sizes = [pair_tokens(p) for p in random_pairs(61, seed=world)]
    budget = 2 * max(sizes)
    bins = balanced_bins(sizes, world, budget)
    assert len(bins) % world == 0
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= budget for b in bins)
    # Close to the fewest possible bins (the bound: total tokens / budget, rounded up per rank).
    fewest = -(-sum(sizes) // (budget * world))
    assert len(bins) // world <= fewest + 1


def test_every_step_means_the_same_pairs_however_they_are_cut():
    pairs = random_pairs(200)
    padded = training(per_device_batch_size=4, gradient_accumulation_steps=2, packing=False)
    packed = training(per_device_batch_size=4, gradient_accumulation_steps=2, max_tokens_per_micro_batch=150)
    one_worker = training(per_device_batch_size=8, gradient_accumulation_steps=2)
    for step in (1, 7, 25, 26):  # 25 steps per epoch: 26 is the next epoch's first
        expected = DataOrder(pairs, padded, world=2).step_pairs(step)
        assert len(expected) == 16
        for cfg, world in ((padded, 2), (packed, 2), (one_worker, 1)):
            order = DataOrder(pairs, cfg, world)
            per_rank = [order.micro_batches(step, rank, max_length=40) for rank in range(world)]
            assert len({len(m) for m in per_rank}) == 1  # as many micro-batches on every rank
            got = [id(p) for micro in sum(per_rank, []) for p, w in zip(micro.pairs, micro.weights) if w == 1]
            assert sorted(got) == sorted(id(p) for p in expected), (step, cfg.packing, world)
            if cfg.packing:
                for micro in sum(per_rank, []):
                    assert sum(pair_tokens(p) for p in micro.pairs) <= micro_batch_budget(cfg, 40)


def test_packed_micro_batches_hold_more_pairs_than_padded_ones_on_long_tailed_data():
    pairs = random_pairs(64, longest=64)
    cfg = training(per_device_batch_size=4, gradient_accumulation_steps=4)  # budget = 2 x 4 x 64 = 512 tokens
    micro = DataOrder(pairs, cfg, world=1).micro_batches(1, 0, max_length=64)
    assert len(micro) < 4 and sum(len(m.pairs) for m in micro) == 16


def test_group_by_length_keeps_epochs_complete_and_steps_similar_but_unsorted():
    pairs = random_pairs(400, longest=64)
    cfg = training(per_device_batch_size=4, gradient_accumulation_steps=1, group_by_length=True, seed=5)
    order = DataOrder(pairs, cfg, world=1)
    epoch = order.epoch(0)
    assert sorted(epoch) == list(range(400))
    assert order.epoch(0) == epoch and DataOrder(pairs, cfg, world=1).epoch(0) == epoch  # seeded
    spreads = [max(map(pair_tokens, order.step_pairs(s))) - min(map(pair_tokens, order.step_pairs(s))) for s in range(1, 101)]
    plain = DataOrder(pairs, cfg.model_copy(update={"group_by_length": False}), world=1)
    plain_spreads = [max(map(pair_tokens, plain.step_pairs(s))) - min(map(pair_tokens, plain.step_pairs(s))) for s in range(1, 101)]
    assert sum(spreads) < 0.5 * sum(plain_spreads)  # pairs of similar length share a step
    longest = [max(map(pair_tokens, order.step_pairs(s))) for s in range(1, 101)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # the steps are shuffled


def test_fewer_pairs_than_one_global_batch_or_a_budget_below_a_pair_is_a_user_error():
    from trainers.errors import UserFacingError

    with pytest.raises(UserFacingError, match="fewer than one global batch of 16"):
        DataOrder(random_pairs(10), training(per_device_batch_size=8), world=2)
    pairs = random_pairs(20, longest=40)
    longest = max(map(pair_tokens, pairs))
    with pytest.raises(UserFacingError, match=f"training.max_tokens_per_micro_batch: {longest - 1} tokens cannot hold a pair"):
        DataOrder(pairs, training(per_device_batch_size=2, max_tokens_per_micro_batch=longest - 1), world=1, max_length=40)


def test_validation_gives_every_rank_as_many_micro_batches_and_every_pair_once():
    pairs = random_pairs(17)
    for cfg in (training(per_device_batch_size=2), training(per_device_batch_size=2, packing=False)):
        per_rank = [validation_micro_batches(pairs, cfg, 40, rank, 2) for rank in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])
        real = [id(p) for m in sum(per_rank, []) for p, w in zip(m.pairs, m.weights) if w == 1]
        assert sorted(real) == sorted(map(id, pairs))
    assert validation_micro_batches([], training(), 40, 0, 2) == []


# --------------------------------------------------------------- packed forwards, every family


def family_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_family_config(family)).eval()


@pytest.mark.exactness
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_log_probs_equal_one_sequence_at_a_time(family):
    """Positions restart (learned absolute positions in GPT-2, partial rotary in GPT-NeoX) and no
    token sees another sequence: each sequence's log-prob in a packed row equals its log-prob
    computed alone, with whole logits or through the chunked head."""
    model = family_model(family)
    pairs = random_pairs(6, seed=3, longest=40)
    alone = []
    reference = Scorer(model, training(packing=False, logprob_chunk_tokens=None), bf16=False)
    with torch.no_grad():
        for s in range(12):  # sequence s of the batch: chosen of pair s, then rejected of pair s - 6
            pair = pairs[s % 6]
            single = TokenizedPair(pair.prompt_ids, pair.chosen_ids if s < 6 else pair.rejected_ids, [1], 0)
            alone.append(reference.sequence_logps(collate_pairs([single], PAD, chosen_only=True), average=False)[0][0])
        alone = torch.stack(alone)
        batch = collate_packed(pairs, PAD, row_tokens=40)
        assert batch.input_ids.shape[0] < 12  # several sequences share rows
        for chunk in (None, 7):  # whole logits first: the chunked head then stays installed on this model
            scorer = Scorer(model, training(logprob_chunk_tokens=chunk), bf16=False)
            packed, counts = scorer.sequence_logps(batch, average=False)
            assert torch.allclose(packed, alone, atol=1e-4, rtol=1e-5), (family, chunk, (packed - alone).abs().max())
        assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


@pytest.mark.exactness
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_validation_kl_through_the_chunked_head_equals_whole_logits(family):
    policy, initial = family_model(family), family_model(family)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pairs = random_pairs(5, seed=4)
    batch_padded, batch_packed = collate_pairs(pairs, PAD), collate_packed(pairs, PAD, row_tokens=40)
    whole = logps_and_kl(Scorer(policy, training(packing=False, logprob_chunk_tokens=None), False),
                         Scorer(initial, training(packing=False, logprob_chunk_tokens=None), False), batch_padded, False)
    chunked = logps_and_kl(Scorer(policy, training(logprob_chunk_tokens=5), False),
                           Scorer(initial, training(logprob_chunk_tokens=5), False), batch_packed, False)
    for got, expected in zip(chunked, whole):
        assert torch.allclose(got.double(), expected.double(), atol=1e-4), (got - expected).abs().max()
    assert chunked[2][:5].sum() > 0  # the policy moved: a real KL was measured


def test_a_family_not_verified_falls_back_to_padding_and_whole_logits():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    cfg, notes = resolve_fast_paths(model, training())
    assert not cfg.packing and cfg.logprob_chunk_tokens is None
    assert len(notes) == 2 and all("'bloom'" in n for n in notes)
    verified = family_model("llama")
    assert resolve_fast_paths(verified, training()) == (training(), [])


# ------------------------------------------------------------------------------ layout by cost


def layout_cost(hidden: int = 384, layers: int = 6, flash: bool = False):
    from trainers.data.batching import LayoutCost

    return LayoutCost(per_position=24.0 * hidden**2 * layers, per_score=4.0 * hidden * layers, per_sequence_attention=flash)


def test_the_chosen_layout_never_computes_more_positions_or_attention_than_padding():
    """Over many micro-batches of every shape: the chosen layout's positions (R x W) and attention
    (R x W^2) are at most the padded layout's (S rows of the longest), and its estimate too."""
    from trainers.data.batching import choose_rows

    rng = random.Random(0)
    cost = layout_cost()
    for trial in range(300):
        n = rng.randrange(1, 20)
        kind = trial % 3
        lengths = ([rng.randrange(140, 161) for _ in range(n)] if kind == 0 else  # uniform
                   [rng.randrange(370, 511) for _ in range(n)] if kind == 1 else  # TL;DR-like
                   [max(2, min(512, int(rng.lognormvariate(4.8, 0.9)))) for _ in range(n)])  # long-tailed
        rows, estimate = choose_rows(lengths, 512, cost)
        padded = cost.estimate(lengths, [[i] for i in range(n)])
        assert estimate.total <= padded.total
        if rows is not None:
            width = max(sum(lengths[i] for i in row) for row in rows)
            assert sorted(i for row in rows for i in row) == list(range(n))
            assert len(rows) < n
            assert len(rows) * width <= n * max(lengths) and len(rows) * width**2 <= n * max(lengths) ** 2
            assert estimate.total <= 0.97 * padded.total  # packing only where it saves
        assert choose_rows(list(lengths), 512, cost) == (rows, estimate)  # deterministic: a resume lays out the same


def test_uniform_and_tldr_lengths_stay_one_per_row_and_long_tailed_ones_pack():
    from trainers.data.batching import choose_rows

    cost = layout_cost()
    # Sixteen sequences of ~150: the old rows of up to 512 held three each (6 x ~450, 3.4x the
    # attention); no row may be longer than the longest sequence, where two never fit.
    uniform = [150 + (i % 11) for i in range(16)]
    assert choose_rows(uniform, 512, cost)[0] is None
    tldr = [400 + 7 * i for i in range(16)]
    assert choose_rows(tldr, 512, cost)[0] is None
    long_tailed = [480, 300, 120, 90, 60, 50, 45, 40, 30, 25, 200, 150, 100, 80, 70, 20]
    rows, estimate = choose_rows(long_tailed, 512, cost)
    assert rows is not None and len(rows) < 8
    assert max(sum(long_tailed[i] for i in row) for row in rows) <= 480
    # With flash-attention varlen a row costs its sequences' own squares: wider rows, fewer of them.
    flash_rows, _ = choose_rows(long_tailed, 512, layout_cost(flash=True))
    assert len(flash_rows) <= len(rows)


def test_flash_attention_lays_out_each_micro_batch_as_one_row_charged_per_sequence():
    """flash_attention_2 is selected from the model's config (no GPU here: the selection and the
    layout are checked, not the kernel). transformers gives flash-attention's varlen kernel the
    boundaries from position_ids only for a batch of one row, so every sequence goes in one row
    (no padding at all), and attention is charged per sequence: sum of L(L+1)/2 scores, where
    SDPA's rows would cost R x W^2."""
    from trainers.data.batching import LayoutCost, choose_rows, collate_by_cost

    model = family_model("gpt_neox")
    assert not LayoutCost.for_model(model, whole_logits=False).per_sequence_attention  # sdpa
    model.config._attn_implementation = "flash_attention_2"
    flash = LayoutCost.for_model(model, whole_logits=False)
    assert flash.per_sequence_attention
    # Mid-length and TL;DR-like micro-batches stay one per row under SDPA; with varlen they pack.
    for lengths in ([150 + (i % 11) for i in range(16)], [400 + 7 * i for i in range(16)]):
        assert choose_rows(lengths, 512, layout_cost())[0] is None
        rows, estimate = choose_rows(lengths, 512, flash)
        assert rows == [list(range(16))]
        assert estimate.attention == sum(n * (n + 1) / 2 for n in lengths) * flash.per_score
        assert estimate.positions == sum(lengths) * flash.per_position
    pairs = [TokenizedPair(list(range(3, 3 + p)), list(range(3, 3 + r)), list(range(5, 5 + r + 2)), i)
             for i, (p, r) in enumerate([(20, 9), (33, 4), (7, 15)])]
    batch = collate_by_cost(pairs, PAD, 64, flash)
    assert batch.packed and batch.input_ids.shape == (1, batch.num_tokens) and batch.num_slots == batch.num_tokens
    assert set(batch.model_inputs()) == {"input_ids", "position_ids"}  # no mask: transformers takes the varlen path
    starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 6 and batch.position_ids[0, -1] > 0  # six sequences, each from 0, no padding segment


def test_collate_by_cost_lays_out_one_unmasked_sequence_per_row_or_packed_rows():
    from trainers.data.batching import collate_by_cost

    cost = layout_cost()
    even = [TokenizedPair(list(range(3, 40)), list(range(3, 30)), list(range(3, 28)), i) for i in range(4)]
    batch = collate_by_cost(even, PAD, 512, cost)
    assert not batch.packed and batch.attention_mask is None and batch.input_ids.shape == (8, 64)
    assert set(batch.model_inputs()) == {"input_ids"}  # SDPA's is_causal kernel, no mask built
    assert batch.sequence_ids[:, 0].tolist() == list(range(8))  # row i is sequence i
    assert batch.estimate is not None and batch.estimate.attention > 0
    skewed = [TokenizedPair(list(range(3, 200)), list(range(3, 100)), [5], 0)] + \
             [TokenizedPair([7, 8], [9, 10, 11], [12], i) for i in range(1, 8)]
    packed = collate_by_cost(skewed, PAD, 512, cost)
    assert packed.packed and packed.input_ids.shape[1] <= 197 + 97 and packed.input_ids.shape[0] < 16


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cost_chosen_layouts_equal_one_sequence_at_a_time(family):
    """Both layouts the default path takes (packed rows, and one sequence per row with no attention
    mask at all) give each sequence the log-prob it has alone, within 1e-5."""
    from trainers.data.batching import collate_by_cost

    model = family_model(family)
    reference = Scorer(model, training(packing=False, logprob_chunk_tokens=None), bf16=False)
    skewed = random_pairs(6, seed=5, longest=40)
    even = [TokenizedPair(p.prompt_ids[:3] + [7] * (12 - len(p.prompt_ids[:3])), [9] * (10 + i % 3), [11] * (9 + i % 2), i)
            for i, p in enumerate(skewed)]
    scorer = Scorer(model, training(), bf16=False)
    with torch.no_grad():
        for pairs, packed in ((skewed, True), (even, False)):
            batch = collate_by_cost(pairs, PAD, 40, scorer.layout_cost)
            assert batch.packed == packed, family
            alone = torch.stack([
                reference.sequence_logps(collate_pairs([TokenizedPair(p.prompt_ids, r, [1], 0)], PAD, chosen_only=True),
                                         average=False)[0][0]
                for p, r in [(p, p.chosen_ids) for p in pairs] + [(p, p.rejected_ids) for p in pairs]])
            got = scorer.sequence_logps(batch, average=False)[0]
            assert torch.allclose(got, alone, atol=1e-5, rtol=1e-5), (family, packed, (got - alone).abs().max())
            whole = Scorer(model, training(logprob_chunk_tokens=None), bf16=False).sequence_logps(batch, average=False)[0]
            assert torch.allclose(whole, alone, atol=1e-5, rtol=1e-5), (family, packed, (whole - alone).abs().max())


def test_layout_metrics_are_reported_only_for_micro_batches_laid_out_by_cost():
    from trainers.step_metrics import LogWindow, StepTotals

    totals = StepTotals.zeros("cpu")
    totals.add(loss=torch.tensor(1.0), pairs=2.0, tokens=90.0, slots=100.0)
    metrics = LogWindow(torch.device("cpu")).metrics(1, 2, totals, torch.tensor(1.0), 1e-4, 0.0)
    assert "train/attention_share" not in metrics and "train/packed_fraction" not in metrics
    totals.add(layout_flops=400.0, attention_flops=100.0, micro_batches=2.0, packed_micro_batches=1.0)
    metrics = LogWindow(torch.device("cpu")).metrics(1, 2, totals, torch.tensor(1.0), 1e-4, 0.0)
    assert metrics["train/attention_share"] == 0.25 and metrics["train/packed_fraction"] == 0.5
