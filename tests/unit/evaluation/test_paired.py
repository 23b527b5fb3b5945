"""Paired seed x prompt comparisons: hand values, a plain bootstrap, and coverage on a known truth."""

import math

import numpy as np
import pytest

from evaluation.paired import ScoreGrid, paired_difference, paired_mean, variance_components

NAN = float("nan")


def test_across_seed_mean_by_hand_with_failures_excluded():
    """Seed 0: (1 + 0) / 2 = 0.5 (the failure is not a loss); seed 1: (1 + 1 + 0.5) / 3 = 5/6.
    Mean over seeds = (0.5 + 5/6) / 2 = 2/3."""
    est = paired_mean(np.array([[1.0, 0.0, NAN], [1.0, 1.0, 0.5]]), resamples=200)
    assert est.mean == pytest.approx(2 / 3)
    assert est.per_seed == pytest.approx((0.5, 5 / 6))
    assert (est.n_seeds, est.n_prompts, est.n_outcomes) == (2, 3, 5)
    assert 0.0 <= est.ci_low <= est.mean <= est.ci_high <= 1.0


def test_records_become_a_grid_with_samples_averaged_and_failures_missing():
    grid = ScoreGrid.from_records([
        (0, "p1", "win"), (0, "p1", "loss"), (0, "p2", "tie"),  # p1 has two samples: (1 + 0) / 2
        (1, "p1", "win"), (1, "p2", "parse_failure"), (1, "p3", None),
    ])
    assert grid.seeds == (0, 1) and grid.prompts == ("p1", "p2", "p3")
    np.testing.assert_array_equal(grid.scores, [[0.5, 0.5, NAN], [1.0, NAN, NAN]])


def test_variance_components_by_hand():
    """y = [[1, 1, 0], [0.5, 1, 0]]: grand mean 7/12, seed means (2/3, 1/2), prompt means (3/4, 1, 0).
    MS_seed = 3 * 2 * (1/12)^2 = 1/24; MS_prompt = 2 * ((1/6)^2 + (5/12)^2 + (7/12)^2) / 2 = 13/24;
    residuals +-(1/6, 1/12, 1/12) -> SS = 2 * (1/36 + 2/144) = 1/12, MS_resid = (1/12) / 2 = 1/24.
    s2_seed = (1/24 - 1/24) / 3 = 0; s2_prompt = (13/24 - 1/24) / 2 = 1/4; s2_resid = 1/24;
    Var = 0/2 + (1/4)/3 + (1/24)/6 = 13/144, SE = sqrt(13)/12."""
    vc = variance_components(np.array([[1.0, 1.0, 0.0], [0.5, 1.0, 0.0]]))
    assert (vc.seed, vc.prompt, vc.residual) == pytest.approx((0.0, 0.25, 1 / 24), abs=1e-12)
    assert vc.standard_error == pytest.approx(math.sqrt(13) / 12)
    # A prompt judged for only one seed is left out of the (complete-grid) ANOVA.
    assert variance_components(np.array([[1.0, 1.0, 0.0, 1.0], [0.5, 1.0, 0.0, NAN]])).n_prompts == 3


def plain_two_way_bootstrap(y, resamples, rng):
    """The scheme written out: draw seeds, draw prompts (the same for every drawn seed), take the
    mean over drawn seeds of each drawn seed's mean over its judged drawn prompts."""
    s, p = y.shape
    out = []
    for _ in range(resamples):
        seeds, prompts = rng.integers(0, s, size=s), rng.integers(0, p, size=p)
        sub = y[np.ix_(seeds, prompts)]
        per_seed = [np.mean(row[~np.isnan(row)]) for row in sub if (~np.isnan(row)).any()]
        out.append(np.mean(per_seed))
    return np.array(out)


def test_vectorised_bootstrap_matches_the_plain_loop():
    rng = np.random.default_rng(1)
    y = rng.choice([0.0, 0.5, 1.0], p=[0.3, 0.2, 0.5], size=(4, 60)) + 0.0
    y[0] = np.clip(y[0] - 0.5, 0, 1)  # a weaker seed, so the seed term matters
    y[rng.random(y.shape) < 0.1] = NAN  # judge failures
    plain = plain_two_way_bootstrap(y, 4000, np.random.default_rng(2))
    est = paired_mean(y, resamples=4000, seed=3)
    # Different random streams: agreement up to Monte Carlo error (~0.003 on these quantiles).
    assert est.ci_low == pytest.approx(np.quantile(plain, 0.025), abs=0.012)
    assert est.ci_high == pytest.approx(np.quantile(plain, 0.975), abs=0.012)
    assert est.standard_error == pytest.approx(plain.std(ddof=1), rel=0.06)
    assert paired_mean(y, resamples=500, seed=3) == paired_mean(y, resamples=500, seed=3)


def simulate_study(rng, seeds=5, prompts=80, seed_sd=0.2, prompt_sd=0.4, mu=0.6, tie=0.2):
    """A known truth: P(win) - P(loss) shifts by a per-seed and a per-prompt effect,
    p_sj = mu + a_s + b_j with a ~ U(-seed_sd/2, seed_sd/2), b ~ U(-prompt_sd/2, prompt_sd/2);
    outcome tie w.p. 0.2, win w.p. p - 0.1, loss otherwise, so E[y_sj] = p_sj and the
    population win rate (over new seeds and new prompts) is exactly mu."""
    a = rng.uniform(-seed_sd / 2, seed_sd / 2, size=(seeds, 1))
    b = rng.uniform(-prompt_sd / 2, prompt_sd / 2, size=(1, prompts))
    p = mu + a + b
    u = rng.random((seeds, prompts))
    return np.where(u < tie, 0.5, np.where(u < tie + p - tie / 2, 1.0, 0.0))


def naive_cell_bootstrap_ci(y, rng, resamples=1000):
    """What not to do: pool every (seed, prompt) cell as if independent."""
    cells = y.ravel()
    means = cells[rng.integers(0, cells.size, size=(resamples, cells.size))].mean(1)
    return np.quantile(means, 0.025), np.quantile(means, 0.975)


def test_coverage_and_width_on_a_known_truth():
    """300 simulated studies (5 seeds x 80 prompts, true win rate 0.6). Theory: Var = s2_seed/5 +
    s2_prompt/80 + s2_resid/400 = 0.00333/5 + 0.01333/80 + ~0.2/400 ~ 0.0013 (SD ~0.036)."""
    rng = np.random.default_rng(0)
    estimates, ses, covered, naive_covered = [], [], 0, 0
    for i in range(300):
        y = simulate_study(rng)
        est = paired_mean(y, resamples=1000, seed=i)
        estimates.append(est.mean)
        ses.append(est.standard_error)
        covered += est.ci_low <= 0.6 <= est.ci_high
        low, high = naive_cell_bootstrap_ci(y, rng)
        naive_covered += low <= 0.6 <= high
    true_sd = np.std(estimates, ddof=1)
    assert np.mean(estimates) == pytest.approx(0.6, abs=0.006)  # unbiased (SE of this mean ~0.002)
    assert 0.031 < true_sd < 0.042
    # The bootstrap SE tracks the true SD, slightly conservative as the docstring says.
    assert 0.9 < np.mean(ses) / true_sd < 1.35
    assert covered / 300 >= 0.90
    # Ignoring the seed and prompt structure misses a large share of the variance.
    assert naive_covered / 300 < 0.86


def test_paired_difference_cancels_the_shared_prompt_effect():
    """x and y share a strong prompt effect (the baseline is unbeatable on half the prompts), and
    x beats the baseline a bit more often. d = x - y keeps only the small paired difference."""
    rng = np.random.default_rng(4)
    prompt_easy = rng.random(200) < 0.5
    base = np.where(prompt_easy, 0.9, 0.1)[None, :] + np.zeros((3, 1))
    x = (rng.random((3, 200)) < base + 0.05).astype(float)
    y = (rng.random((3, 200)) < base - 0.05).astype(float)
    diff = paired_difference(x, y, resamples=2000)
    ex, ey = paired_mean(x, resamples=2000), paired_mean(y, resamples=2000)
    assert diff.mean == pytest.approx(ex.mean - ey.mean)  # complete grids: difference of means
    unpaired_half_width = 1.96 * math.hypot(ex.standard_error, ey.standard_error)
    assert (diff.ci_high - diff.ci_low) / 2 < 0.75 * unpaired_half_width


def test_labelled_difference_pairs_cells_by_seed_and_prompt():
    """x has prompts (a, b), y has (b, a, c) in another order: only (seed, a) and (seed, b) pair.
    Seed 0: (1 - 0.5) on a, (0 - 0) on b -> 0.25; seed 1: (1 - 1), (1 - 0) -> 0.5. Mean 0.375."""
    x = ScoreGrid(np.array([[1.0, 0.0], [1.0, 1.0]]), seeds=(0, 1), prompts=("a", "b"))
    y = ScoreGrid(np.array([[0.0, 0.5, 1.0], [0.0, 1.0, 1.0]]), seeds=(0, 1), prompts=("b", "a", "c"))
    est = paired_difference(x, y, resamples=200)
    assert est.per_seed == pytest.approx((0.25, 0.5))
    assert est.mean == pytest.approx(0.375) and est.n_prompts == 2


def test_fixed_seeds_interval_is_narrower_when_seeds_differ():
    """With a real seed effect, resample_seeds=False (conditional on the trained models) must give a
    narrower interval than the two-way scheme."""
    rng = np.random.default_rng(5)
    y = simulate_study(rng, seeds=4, seed_sd=0.5)
    both = paired_mean(y, resamples=2000)
    prompts_only = paired_mean(y, resamples=2000, resample_seeds=False)
    assert prompts_only.mean == both.mean
    assert prompts_only.ci_high - prompts_only.ci_low < 0.8 * (both.ci_high - both.ci_low)


def test_grids_interpolated_at_a_matched_kl_by_hand():
    """Checkpoints at KL 1 and 3; at KL 2 each cell is the mean of the two: [[1, 0], [0.5, 1]] and
    [[1, 1], [0.5, 0]] -> [[1, 0.5], [0.5, 0.5]]. Outside [1, 3]: None (no extrapolation)."""
    from evaluation.paired import interpolate_grids

    a, b = np.array([[1.0, 0.0], [0.5, 1.0]]), np.array([[1.0, 1.0], [0.5, 0.0]])
    np.testing.assert_allclose(interpolate_grids([a, b], [1.0, 3.0], 2.0), [[1.0, 0.5], [0.5, 0.5]])
    assert interpolate_grids([a, b], [1.0, 3.0], 3.5) is None
    # Labelled grids align by prompt; a cell one checkpoint lacks stays missing.
    ga = ScoreGrid(a, seeds=(0, 1), prompts=("p", "q"))
    gb = ScoreGrid(np.array([[1.0], [0.0]]), seeds=(0, 1), prompts=("q",))
    mid = interpolate_grids([ga, gb], [1.0, 3.0], 1.5)  # weights 0.75 on a, 0.25 on b
    assert mid.prompts == ("p", "q")
    np.testing.assert_allclose(mid.scores, [[NAN, 0.25], [NAN, 0.75]])
    # Paired difference at the matched KL: x interpolated as above minus y = 0.5 everywhere.
    est = paired_difference(interpolate_grids([a, b], [1.0, 3.0], 2.0), np.full((2, 2), 0.5), resamples=200)
    assert est.mean == pytest.approx((0.25 + 0.0) / 2)
