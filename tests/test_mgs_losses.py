"""REINFORCE and minimum-risk losses of simbook.optim.mgs against brute-force enumeration."""
import itertools

import pytest
import torch

from simbook.optim.mgs import minimum_risk_loss, reinforce_loss


@pytest.mark.parametrize("n", [2, 3])
def test_reinforce_is_unbiased_by_enumeration(n):
    torch.manual_seed(n)
    logits = torch.randn(4, dtype=torch.float64, requires_grad=True)
    reward = torch.randn(4, dtype=torch.float64)
    exact = torch.autograd.grad((torch.softmax(logits, 0) * reward).sum(), logits)[0]
    expected = torch.zeros(4, dtype=torch.float64)
    for draw in itertools.product(range(4), repeat=n):
        idx = list(draw)
        logp = torch.log_softmax(logits, 0)
        weight = logp[idx].sum().exp().detach()
        expected -= weight * torch.autograd.grad(reinforce_loss(logp[idx], reward[idx]), logits)[0]
    assert torch.allclose(expected, exact, atol=1e-12)


def test_reinforce_value_by_hand():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    r = torch.tensor([1.0, 0.0, 2.0])
    b = torch.tensor([1.0, 1.5, 0.5])
    assert torch.allclose(reinforce_loss(lp, r), -((r - b) * lp).mean())
    # equal rewards carry no signal
    assert reinforce_loss(lp, torch.ones(3)).item() == 0.0


def test_minimum_risk_by_enumeration_and_finite_differences():
    lp = torch.tensor([-1.3, -0.2, -2.0, -0.9], dtype=torch.float64, requires_grad=True)
    risk = torch.tensor([0.5, 0.1, 0.9, 0.3], dtype=torch.float64)
    for alpha in (0.25, 1.0, 3.0):
        p = lp.detach().exp() ** alpha
        brute = sum(p[i] / p.sum() * risk[i] for i in range(4))
        assert torch.allclose(minimum_risk_loss(lp, risk, alpha), brute)
        g = torch.autograd.grad(minimum_risk_loss(lp, risk, alpha), lp)[0]
        eye = torch.eye(4, dtype=torch.float64)
        fd = torch.stack([(minimum_risk_loss(lp.detach() + 1e-6 * e, risk, alpha)
                           - minimum_risk_loss(lp.detach() - 1e-6 * e, risk, alpha)) / 2e-6 for e in eye])
        assert torch.allclose(g, fd, atol=1e-8)


def test_bad_inputs():
    lp = torch.zeros(3)
    with pytest.raises(TypeError):
        reinforce_loss([0.0, 1.0], torch.zeros(2))
    with pytest.raises(ValueError):
        reinforce_loss(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError):
        reinforce_loss(lp, torch.zeros(2))
    with pytest.raises(ValueError):
        reinforce_loss(lp, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError):
        minimum_risk_loss(lp, torch.zeros(3), alpha=0.0)
    with pytest.raises(TypeError):
        minimum_risk_loss(lp, torch.zeros(3), alpha="1")
    with pytest.raises(ValueError):
        minimum_risk_loss(torch.zeros(2, 2), torch.zeros(2, 2))
