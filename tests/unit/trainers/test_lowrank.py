"""The low-rank (LoRA) reference update against the paper's rule computed densely in weight space."""

import math

import pytest
import torch

from trainers.trdpo.lowrank import (
    LowRankErrorBound,
    LowRankUpdate,
    lowrank_hard_update_,
    lowrank_norm,
    lowrank_soft_update_,
    recompress,
)


def factors(out, r, inp, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=dtype), torch.randn(r, inp, generator=g, dtype=dtype) / 4


def empty_reference(out, rank, inp):
    return torch.zeros(out, rank), torch.zeros(rank, inp)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_one_update_is_the_weight_space_blend_not_a_blend_of_factors():
    """ref = B2 A2, policy = B1 A1, alpha 0.6: the stored delta is 0.6 B1 A1 + 0.4 B2 A2; mixing the
    factors, (0.6 B1 + 0.4 B2)(0.6 A1 + 0.4 A2), is measurably something else."""
    B1, A1 = factors(12, 3, 10, 0)
    B2, A2 = factors(12, 3, 10, 1)
    ref_B, ref_A = empty_reference(12, 8, 10)
    ref_B[:, :3], ref_A[:3] = B2, A2
    out = lowrank_soft_update_(ref_B, ref_A, B1, A1, 0.6)
    exact = 0.6 * B1 @ A1 + 0.4 * B2 @ A2
    assert rel(ref_B @ ref_A, exact) < 1e-6
    assert out.rank == 6 and out.discarded < 1e-6 * out.norm
    assert math.isclose(out.norm, float(exact.double().norm()), rel_tol=1e-6)
    mixed = (0.6 * B1 + 0.4 * B2) @ (0.6 * A1 + 0.4 * A2)
    assert rel(mixed, exact) > 0.1


def test_k_updates_equal_the_closed_form_sum_over_the_policies_seen():
    """After K updates from a zero reference: sum_k alpha (1-alpha)^(K-k) dW_policy(k)."""
    alpha, K = 0.6, 6
    ref_B, ref_A = empty_reference(16, 32, 11)
    policies = [factors(16, 4, 11, seed) for seed in range(K)]
    for B, A in policies:
        lowrank_soft_update_(ref_B, ref_A, B, A, alpha)
    closed = sum(alpha * (1 - alpha) ** (K - 1 - k) * (B.double() @ A.double()) for k, (B, A) in enumerate(policies))
    assert rel(ref_B @ ref_A, closed) < 1e-6


def test_past_its_rank_the_reference_is_the_best_approximation_and_the_cut_is_reported():
    """A rank-10 delta (0.5 B1 A1 + 0.5 B2 A2, ranks 4 + 6) into a rank-5 reference with alpha 1:
    Eckart-Young's truncation of the dense matrix, and the reported cut is the norm of the singular
    values left out."""
    B1, A1 = factors(20, 4, 15, 2)
    B2, A2 = factors(20, 6, 15, 3)
    policy_B, policy_A = torch.cat([0.5 * B1, 0.5 * B2], 1), torch.cat([A1, A2], 0)
    exact = 0.5 * B1.double() @ A1.double() + 0.5 * B2.double() @ A2.double()
    ref_B, ref_A = empty_reference(20, 5, 15)
    out = lowrank_soft_update_(ref_B, ref_A, policy_B, policy_A, 1.0)
    u, s, vh = torch.linalg.svd(exact)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert out.rank == 5
    assert rel(ref_B @ ref_A, best) < 1e-6
    assert math.isclose(out.discarded, float(s[5:].norm()), rel_tol=1e-6)
    assert math.isclose(out.norm, float(s[:5].norm()), rel_tol=1e-6)


def test_the_error_bound_holds_and_is_tight_enough_to_be_useful():
    """A reference too small for its history: the true distance to the dense rule never exceeds
    the bound, and the bound is not absurdly loose (within 10x of the truth at the end)."""
    alpha = 0.3
    ref_B, ref_A = empty_reference(24, 6, 18)
    bound = LowRankErrorBound(alpha)
    dense = torch.zeros(24, 18, dtype=torch.float64)
    for step in range(15):
        B, A = factors(24, 3, 18, 100 + step)
        update = lowrank_soft_update_(ref_B, ref_A, B, A, alpha)
        dense = alpha * B.double() @ A.double() + (1 - alpha) * dense
        relative = bound.update([update])
        truth = float((ref_B.double() @ ref_A.double() - dense).norm() / (ref_B.double() @ ref_A.double()).norm())
        assert truth <= relative * (1 + 1e-6) + 1e-7
    assert relative > 0.01  # rank 3 per step into 6 columns at alpha 0.3 must cut a lot
    assert relative < 10 * truth


def test_a_slowly_moving_policy_is_kept_within_1e_4_at_alpha_0_3_by_the_default_tolerance():
    """The regime of training: the adapter drifts a little per update. At alpha 0.3 the reference
    remembers ~30 updates to 1e-5, far more than rank 8 x 4 columns could hold if each were new,
    but a smooth trajectory has few significant directions: the bound stays under 1e-4."""
    alpha, r, out_dim, in_dim = 0.3, 8, 256, 192  # wider than the buffer's 64 columns: rank is really bounded
    B, A = factors(out_dim, r, in_dim, 7)
    ref_B, ref_A = empty_reference(out_dim, 8 * r, in_dim)
    bound = LowRankErrorBound(alpha)
    dense = torch.zeros(out_dim, in_dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    for _ in range(120):
        B = B + 0.02 * torch.randn(B.shape, generator=g)
        A = A + 0.005 * torch.randn(A.shape, generator=g)
        relative = bound.update([lowrank_soft_update_(ref_B, ref_A, B, A, alpha)])
        dense = alpha * B.double() @ A.double() + (1 - alpha) * dense
    truth = rel(ref_B @ ref_A, dense)
    assert truth < 1e-4 and relative < 1e-4
    assert int((ref_B.abs().sum(0) > 0).sum()) == 8 * r  # the buffer is full: the tolerance, not room, decided


def test_alpha_zero_keeps_and_alpha_one_takes_the_policy():
    B, A = factors(9, 2, 7, 4)
    ref_B, ref_A = empty_reference(9, 4, 7)
    ref_B[:, :2], ref_A[:2] = factors(9, 2, 7, 5)
    before = ref_B.clone(), ref_A.clone()
    out = lowrank_soft_update_(ref_B, ref_A, B, A, 0.0)
    assert torch.equal(ref_B, before[0]) and torch.equal(ref_A, before[1])
    assert out.discarded == 0.0 and math.isclose(out.norm, float((before[0].double() @ before[1].double()).norm()), rel_tol=1e-9)
    lowrank_soft_update_(ref_B, ref_A, B, A, 1.0)
    assert rel(ref_B @ ref_A, B @ A) < 1e-6


def test_hard_update_is_a_bitwise_copy_into_the_leading_columns():
    B, A = factors(9, 2, 7, 6)
    ref_B, ref_A = torch.ones(9, 2), torch.ones(2, 7)
    lowrank_hard_update_(ref_B, ref_A, B, A)
    assert torch.equal(ref_B, B) and torch.equal(ref_A, A)
    wide_B, wide_A = torch.ones(9, 5), torch.ones(5, 7)
    lowrank_hard_update_(wide_B, wide_A, B, A)
    assert torch.equal(wide_B[:, :2], B) and not wide_B[:, 2:].any() and not wide_A[2:].any()
    with pytest.raises(ValueError, match="cannot hold"):
        lowrank_hard_update_(torch.zeros(9, 1), torch.zeros(1, 7), B, A)


def test_shapes_that_cannot_pair_are_refused():
    B, A = factors(9, 2, 7, 0)
    with pytest.raises(ValueError, match="reference delta is 9 x 6"):
        lowrank_soft_update_(torch.zeros(9, 4), torch.zeros(4, 6), B, A, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        lowrank_soft_update_(torch.zeros(9, 4), torch.zeros(4, 7), B, A, 1.5)


def test_norm_without_the_dense_product():
    B, A = factors(30, 5, 20, 9)
    assert math.isclose(lowrank_norm(B, A), float((B.double() @ A.double()).norm()), rel_tol=1e-12)


def test_recompress_of_zero_factors_is_empty():
    B, A, norm, cut = recompress(torch.zeros(5, 3), torch.zeros(3, 4), 3, 1e-6)
    assert B.shape == (5, 0) and A.shape == (0, 4) and norm == 0.0 and cut == 0.0


def test_error_bound_state_round_trips_and_refuses_another_alpha():
    bound = LowRankErrorBound(0.5)
    bound.update([LowRankUpdate(norm=2.0, discarded=0.1, rank=3), LowRankUpdate(norm=1.0, discarded=0.0, rank=1)])
    # errors (0.5 * 0.1 + 0.1, 0.5 * 0 + 0.1) = (0.15, 0.1) over norms (2, 2): the worst is 0.075
    assert bound.update([LowRankUpdate(norm=2.0, discarded=0.1, rank=3)] * 2) == pytest.approx(0.075)
    again = LowRankErrorBound(0.5)
    again.load_state_dict(bound.state_dict())
    assert again.relative() == bound.relative()
    with pytest.raises(ValueError, match="alpha"):
        LowRankErrorBound(0.6).load_state_dict(bound.state_dict())
    bound.reset()
    assert bound.relative() == 0.0
