import pytest
import torch

from trainers.trdpo import ReferenceUpdater, hard_update_, soft_update_


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]


def test_alpha_zero_leaves_reference_alpha_one_copies_policy():
    ref, policy = tensors(0), tensors(1)
    before = [r.clone() for r in ref]
    soft_update_(ref, policy, 0.0)
    assert all(torch.equal(r, b) for r, b in zip(ref, before))
    soft_update_(ref, policy, 1.0)
    assert all(torch.equal(r, p) for r, p in zip(ref, policy))  # bit-exact, not merely close


def test_soft_mix_is_the_exact_blend():
    """ref=2, policy=10, alpha=0.25: 0.25*10 + 0.75*2 = 2.5 + 1.5 = 4."""
    ref, policy = [torch.full((3,), 2.0)], [torch.full((3,), 10.0)]
    soft_update_(ref, policy, 0.25)
    assert torch.equal(ref[0], torch.full((3,), 4.0))
    ref, policy = tensors(0), tensors(1)
    expected = [0.6 * p + 0.4 * r for r, p in zip(ref, policy)]
    soft_update_(ref, policy, 0.6)
    assert all(torch.allclose(r, e, atol=1e-6) for r, e in zip(ref, expected))


def test_hard_update_copies_and_does_not_alias():
    ref, policy = tensors(0), tensors(1)
    hard_update_(ref, policy)
    assert all(torch.equal(r, p) for r, p in zip(ref, policy))
    policy[0].add_(1.0)
    assert not torch.equal(ref[0], policy[0])


@pytest.mark.parametrize("mode, alpha, tau", [("soft", 0.5, 3), ("hard", None, 4), ("soft", 0.6, 1)])
def test_updates_happen_exactly_at_multiples_of_tau(mode, alpha, tau):
    updater = ReferenceUpdater(mode, alpha=alpha, tau=tau)
    ref, policy = [torch.zeros(4)], [torch.zeros(4)]
    changed_at = []
    for step in range(1, 13):
        policy[0].fill_(float(step))  # the policy moves every step
        before = ref[0].clone()
        did = updater.maybe_update(step, ref, policy)
        if not torch.equal(before, ref[0]):
            changed_at.append(step)
        assert did == (step % tau == 0)
    assert changed_at == list(range(tau, 13, tau))
    assert updater.n_updates == len(changed_at) and updater.update_steps == changed_at


def test_none_never_updates_and_state_round_trips():
    none = ReferenceUpdater("none")
    assert not any(none.is_due(s) for s in range(0, 100))
    updater = ReferenceUpdater("hard", tau=2)
    for step in range(1, 7):
        updater.maybe_update(step, [torch.zeros(1)], [torch.ones(1)])
    restored = ReferenceUpdater("hard", tau=2)
    restored.load_state_dict(updater.state_dict())
    assert restored.n_updates == 3 and restored.update_steps == [2, 4, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "soft", "alpha": None, "tau": 1}, "needs alpha"),
        ({"mode": "soft", "alpha": 1.5, "tau": 1}, "needs alpha"),
        ({"mode": "soft", "alpha": 0.5, "tau": 0}, "tau >= 1"),
        ({"mode": "hard", "alpha": 0.5, "tau": 2}, "alpha must not be set"),
        ({"mode": "none", "alpha": None, "tau": 4}, "neither alpha nor tau"),
    ],
)
def test_invalid_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReferenceUpdater(**kwargs)


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError, match="shape"):
        soft_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="tensors"):
        hard_update_([torch.zeros(2)], [])
