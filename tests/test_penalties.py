"""The penalties against closed forms worked out by hand."""
import math

import pytest
import torch

from domainbed_sil.penalties import (
    classification_loss,
    irm_penalty,
    safe_sqrt,
    score_norms,
    sil_penalty,
    variance,
    vrex_penalty,
)



@pytest.fixture
def linear_env():
    """Logistic regression f(x) = w.x + b on 5 samples of 3 features."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    b = torch.tensor(0.3, dtype=torch.float64)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    return w, b, x, y


def test_score_norm_of_logistic_regression_matches_closed_form(linear_env):
    # d/dx_i of mean_j l(w.x_j + b, y_j) = (sigmoid(f_i) - y_i) w / N
    w, b, x, y = linear_env
    x = x.clone().requires_grad_(True)
    f = x @ w + b
    risk = classification_loss(f[:, None], y)
    expected = w.norm() * (torch.sigmoid(f.detach()) - y).norm() / len(y)
    (norm,) = score_norms([risk], [x])
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sil_penalty_with_two_envs_is_abs_difference_over_sqrt2():
    norms = torch.tensor([3.0, 5.0])
    assert sil_penalty(norms).item() == pytest.approx(2.0 / math.sqrt(2.0))


def test_sil_penalty_population_convention_is_half_the_difference():
    assert sil_penalty(torch.tensor([3.0, 5.0]), "population").item() == pytest.approx(1.0)


def test_sil_penalty_gradient_is_finite_and_zero_when_all_norms_are_equal():
    norms = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    penalty = sil_penalty(norms)
    penalty.backward()
    assert penalty.item() == 0.0
    assert torch.isfinite(norms.grad).all() and (norms.grad == 0).all()


def test_sil_penalty_through_double_backprop_is_zero_and_finite_for_identical_envs(linear_env):
    w, b, x, y = linear_env
    w = w.clone().requires_grad_(True)
    xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]  # float64 throughout
    risks = [classification_loss((xe @ w + b)[:, None], y) for xe in xs]
    penalty = sil_penalty(score_norms(risks, xs))
    penalty.backward()
    assert penalty.item() == 0.0
    assert torch.isfinite(w.grad).all()


def test_sil_penalty_grows_with_the_difference_between_environments(linear_env):
    w, b, x, y = linear_env
    penalties = []
    for scale in (1.0, 1.5, 3.0):
        xs = [x.clone().requires_grad_(True), (scale * x).requires_grad_(True)]
        risks = [classification_loss((xe @ w + b)[:, None], y) for xe in xs]
        penalties.append(sil_penalty(score_norms(risks, xs)).item())
    assert penalties[0] == pytest.approx(0.0, abs=1e-12)
    assert penalties[0] < penalties[1] < penalties[2]


def test_safe_sqrt_has_zero_gradient_at_zero():
    v = torch.tensor(0.0, requires_grad=True)
    safe_sqrt(v).backward()
    assert v.grad.item() == 0.0


def test_irm_full_penalty_is_squared_mean_of_residual_times_logit(linear_env):
    # d/ds mean l(s f_i, y_i) at s=1 = mean((sigmoid(f_i) - y_i) f_i)
    w, b, x, y = linear_env
    f = x @ w + b
    expected = ((torch.sigmoid(f) - y) * f).mean() ** 2
    assert irm_penalty(f[:, None], y, "full").item() == pytest.approx(expected.item(), rel=1e-9)


def test_irm_two_halves_penalty_is_product_of_even_and_odd_gradients(linear_env):
    w, b, x, y = linear_env
    f = x @ w + b
    g = lambda idx: ((torch.sigmoid(f[idx]) - y[idx]) * f[idx]).mean()
    expected = g(slice(0, None, 2)) * g(slice(1, None, 2))
    assert irm_penalty(f[:, None], y, "two_halves").item() == pytest.approx(expected.item(), rel=1e-9)


def test_irm_penalty_for_cross_entropy_is_differentiable():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    irm_penalty(logits, y).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("convention, expected", [("pairwise", 4.0), ("unbiased", 2.0), ("population", 1.0)])
def test_vrex_penalty_of_risks_one_and_three(convention, expected):
    assert vrex_penalty(torch.tensor([1.0, 3.0]), convention).item() == pytest.approx(expected)


def test_pairwise_variance_is_mean_squared_pairwise_difference_for_three_envs():
    v = torch.tensor([1.0, 2.0, 4.0])
    pairs = [(1 - 2) ** 2, (1 - 4) ** 2, (2 - 4) ** 2]
    assert variance(v, "pairwise").item() == pytest.approx(sum(pairs) / 3)


def test_variance_rejects_unknown_convention_and_single_env():
    with pytest.raises(ValueError, match="one of"):
        variance(torch.tensor([1.0, 2.0]), "sample")
    with pytest.raises(ValueError, match="at least 2"):
        variance(torch.tensor([1.0]))
