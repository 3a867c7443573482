"""The penalties against closed forms worked out by hand."""
import math

import pytest
import torch

from domainbed_sil.penalties import (
    classification_loss,
    gram,
    irm_penalty,
    l2_norm,
    safe_sqrt,
    score_norms,
    score_norms_through_linear,
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


def test_l2_norm_value_and_gradient_match_torch_vector_norm():
    torch.manual_seed(0)
    s = torch.randn(50, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = l2_norm(s)
    reference = torch.linalg.vector_norm(s)
    assert torch.allclose(ours, reference)
    (g_ours,) = torch.autograd.grad(3.0 * ours, [s])
    (g_ref,) = torch.autograd.grad(3.0 * reference, [s])
    assert torch.allclose(g_ours, g_ref)
    assert torch.autograd.gradcheck(l2_norm, (s,))


def test_l2_norm_gradient_is_zero_not_nan_at_the_zero_vector():
    s = torch.zeros(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(l2_norm(s), [s])
    assert torch.equal(grad, torch.zeros(4, 3))


def test_l2_norm_of_half_precision_scores_is_float32():
    s = torch.full((8, 4), 0.5, dtype=torch.bfloat16, requires_grad=True)
    norm = l2_norm(s)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(0.5 * (32 ** 0.5))
    (grad,) = torch.autograd.grad(norm, [s])
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_score_norm_gradient_reaches_the_parameters_through_the_single_pass_norm(linear_env):
    """The custom norm backward must keep the double-backprop graph of the score intact."""
    w0, b, x, y = linear_env
    w = w0.clone().requires_grad_(True)

    def norm_of_score(norm_fn):
        xs = x.clone().requires_grad_(True)
        risk = classification_loss((xs @ w + b)[:, None], y)
        (score,) = torch.autograd.grad(risk, [xs], create_graph=True)
        (grad_w,) = torch.autograd.grad(norm_fn(score), [w])
        return grad_w

    assert torch.allclose(norm_of_score(l2_norm), norm_of_score(torch.linalg.vector_norm))


def _mlp_envs(hidden, in_features=12, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)).double()
    # at initialisation |dl/dlogit| is about 1/2 for every sample, so the mean risk's score norm
    # scales as 1/sqrt(N): environments of n and n/2 samples differ clearly
    envs = [(torch.randn(size, in_features, generator=gen, dtype=torch.float64),
             (torch.rand(size, generator=gen) < 0.5).double()) for size in (n, n // 2)]
    return mlp, envs


def _sil_penalty_and_grads(mlp, envs, through_linear):
    risks, inputs, projections = [], [], []
    for x, y in envs:
        x = x.clone().requires_grad_(not through_linear)
        z = mlp[0](x)
        risks.append(classification_loss(mlp[2](mlp[1](z)), y))
        inputs.append(x)
        projections.append(z)
    if through_linear:
        norms = score_norms_through_linear(risks, projections, mlp[0].weight)
    else:
        norms = score_norms(risks, inputs)
    penalty = sil_penalty(norms)
    return norms, penalty, torch.autograd.grad(penalty, list(mlp.parameters()))


@pytest.mark.parametrize("hidden", [5, 30])
def test_score_norms_through_the_first_linear_layer_equal_the_double_backprop_ones(hidden):
    mlp, envs = _mlp_envs(hidden)
    norms_ref, penalty_ref, grads_ref = _sil_penalty_and_grads(mlp, envs, through_linear=False)
    norms, penalty, grads = _sil_penalty_and_grads(mlp, envs, through_linear=True)
    assert torch.allclose(norms, norms_ref.to(norms.dtype), rtol=1e-10)
    assert penalty.item() == pytest.approx(penalty_ref.item(), rel=1e-9)
    assert abs(norms_ref[0] - norms_ref[1]) > 0.05 * norms_ref[0]  # the two environments really differ
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-8, atol=1e-12)


def test_score_norms_through_linear_are_zero_with_finite_gradient_when_the_score_vanishes():
    # a zero output layer makes dR/dz = 0 for every sample: sqrt at 0 must give 0, not NaN
    mlp, envs = _mlp_envs(7)
    with torch.no_grad():
        mlp[2].weight.zero_()
    norms, penalty, grads = _sil_penalty_and_grads(mlp, envs, through_linear=True)
    assert norms.tolist() == [0.0, 0.0] and penalty.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads)


def test_gram_value_and_single_product_gradient_match_autograd():
    g = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.allclose(gram(g), g.T @ g)
    assert torch.autograd.gradcheck(gram, (g,))
