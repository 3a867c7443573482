"""Each algorithm behind the one update() contract, on real Colored MNIST samples."""
import pytest
import torch

from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.datasets import DATASETS
from domainbed_sil.hparams import apply_overrides, default_hparams, random_hparams

CORE = ["ERM", "IRM", "VREx", "SIL"]


def make_algorithm(name, **overrides):
    hparams = apply_overrides(default_hparams(ALGORITHMS.get(name), DATASETS.get("ColoredMNIST")), overrides)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ALGORITHMS.get(name)((2, 14, 14), 2, 2, hparams)


def test_registry_lists_the_four_algorithms():
    assert set(CORE) <= set(ALGORITHMS.names())


def test_unknown_algorithm_error_lists_valid_names():
    with pytest.raises(ValueError, match="unknown algorithm 'Nope'; valid names: .*ERM.*SIL"):
        ALGORITHMS.get("Nope")


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("phase", ["warmup", "penalised"])
def test_update_lowers_its_own_objective(name, phase, small_cmnist_batches):
    # "penalised": the penalty weight is on from the first step, rescaled objective included
    warmup = 1000 if phase == "warmup" else 0
    algorithm = make_algorithm(name, hidden_dim=64, warmup_steps=warmup)
    before = algorithm.objective(small_cmnist_batches)["loss"].item()
    for _ in range(8):
        out = algorithm.update(small_cmnist_batches)
    after = algorithm.objective(small_cmnist_batches)["loss"].item()
    assert set(out) >= {"loss", "nll", "penalty", "penalty_weight"}
    assert all(isinstance(v, float) for v in out.values())
    assert after < before


@pytest.mark.parametrize("name", ["IRM", "VREx", "SIL"])
def test_penalty_weight_is_one_during_warmup_then_lambda(name, small_cmnist_batches):
    algorithm = make_algorithm(name, hidden_dim=16, warmup_steps=2, penalty_weight=50.0)
    weights = [algorithm.update(small_cmnist_batches)["penalty_weight"] for _ in range(4)]
    assert weights == [1.0, 1.0, 50.0, 50.0]


def test_loss_is_divided_by_the_penalty_weight_above_one(small_cmnist_batches):
    plain = make_algorithm("VREx", hidden_dim=16, warmup_steps=0, penalty_weight=50.0, rescale_loss=False)
    scaled = make_algorithm("VREx", hidden_dim=16, warmup_steps=0, penalty_weight=50.0)
    a = plain.objective(small_cmnist_batches)["loss"].item()
    b = scaled.objective(small_cmnist_batches)["loss"].item()
    assert b == pytest.approx(a / 50.0, rel=1e-5)


def test_optimizer_reset_at_warmup_is_optional(small_cmnist_batches):
    kept = make_algorithm("IRM", hidden_dim=16, warmup_steps=2)
    reset = make_algorithm("IRM", hidden_dim=16, warmup_steps=2, reset_optimizer_at_warmup=True)
    for algorithm in (kept, reset):
        for _ in range(3):
            algorithm.update(small_cmnist_batches)
    step_of = lambda a: next(iter(a.optimizer.state.values()))["step"].item()
    assert step_of(kept) == 3 and step_of(reset) == 1


def test_vrex_on_cmnist_reproduces_the_rex_script_objective(small_cmnist_batches):
    # REx script: loss = (R1 + R2) + l2 * sum||p||^2 + w (R1 - R2)^2, divided by w when w > 1
    algorithm = make_algorithm("VREx", hidden_dim=16, warmup_steps=0)
    net, w, l2 = algorithm.network, algorithm.hparams["penalty_weight"], algorithm.hparams["l2_weight"]
    risks = [torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y) for x, y in small_cmnist_batches]
    norm = sum(p.pow(2).sum() for p in net.parameters())
    expected = ((risks[0] + risks[1]) + l2 * norm + w * (risks[0] - risks[1]) ** 2) / w
    assert algorithm.objective(small_cmnist_batches)["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_irm_uses_full_batch_estimator_on_full_batch_and_two_halves_on_minibatches():
    assert make_algorithm("IRM", hidden_dim=8).estimator() == "full"
    assert make_algorithm("IRM", hidden_dim=8, batch_size=64).estimator() == "two_halves"


def test_grayscale_oracle_cannot_see_colour():
    oracle = make_algorithm("ERM", hidden_dim=8, grayscale_model=True)
    x = torch.rand(4, 2, 14, 14)
    swapped = x.flip(1)  # same digit, other colour
    assert torch.allclose(oracle.predict(x), oracle.predict(swapped), atol=1e-6)


def test_protocol_rows_are_the_colored_mnist_defaults():
    sil1 = default_hparams(ALGORITHMS.get("SIL"), DATASETS.get("ColoredMNIST"))
    sil2 = default_hparams(ALGORITHMS.get("SIL"), DATASETS.get("ColoredMNISTNoFlip"))
    irm = default_hparams(ALGORITHMS.get("IRM"), DATASETS.get("ColoredMNIST"))
    assert (sil1["hidden_dim"], sil1["lr"], sil1["warmup_steps"], sil1["penalty_weight"]) == (321, 7.35e-4, 171, 23921.0)
    assert (sil2["hidden_dim"], sil2["lr"], sil2["warmup_steps"], sil2["penalty_weight"]) == (461, 6.93e-4, 162, 44431.0)
    assert (irm["hidden_dim"], irm["warmup_steps"], irm["penalty_weight"]) == (390, 190, 91257.18613115903)


def test_random_search_is_deterministic_and_inside_the_papers_sil_space():
    sil, cmnist = ALGORITHMS.get("SIL"), DATASETS.get("ColoredMNIST")
    draws = [random_hparams(sil, cmnist, hseed, 0) for hseed in range(1, 26)]
    assert draws == [random_hparams(sil, cmnist, hseed, 0) for hseed in range(1, 26)]
    assert len({d["lr"] for d in draws}) == 25
    for d in draws:
        assert 10**-3.5 <= d["lr"] <= 10**-2.5
        assert 256 <= d["hidden_dim"] <= 512
        assert 1 <= d["penalty_weight"] <= 1e5
        assert 100 <= d["warmup_steps"] <= 200


def test_unknown_or_mistyped_hparam_override_is_rejected():
    defaults = default_hparams(ALGORITHMS.get("SIL"), DATASETS.get("ColoredMNIST"))
    with pytest.raises(ValueError, match="unknown hparam.*'lrr'.*valid names"):
        apply_overrides(defaults, {"lrr": 0.1})
    with pytest.raises(ValueError, match="'hidden_dim' expects a value of type int"):
        apply_overrides(defaults, {"hidden_dim": "big"})


@pytest.mark.parametrize("hidden", [64, 700])
def test_sil_score_norm_through_the_input_layer_gives_the_same_updates_as_the_direct_score(hidden, small_cmnist_batches):
    # hidden 64: "auto" goes through the input layer; 700 > 1.5 x 392: "auto" falls back to the direct score
    fast = make_algorithm("SIL", hidden_dim=hidden, warmup_steps=0, penalty_weight=2e4)
    direct = make_algorithm("SIL", hidden_dim=hidden, warmup_steps=0, penalty_weight=2e4, score_norm_method="autograd")
    assert (fast._input_linear() is not None) == (hidden == 64)
    assert direct._input_linear() is None
    for _ in range(3):
        out_fast, out_direct = fast.update(small_cmnist_batches), direct.update(small_cmnist_batches)
        assert out_fast["penalty"] > 0
        assert out_fast["penalty"] == pytest.approx(out_direct["penalty"], rel=1e-3)
        assert out_fast["loss"] == pytest.approx(out_direct["loss"], rel=1e-3)  # float32 rounding of a difference of norms
    for p_fast, p_direct in zip(fast.parameters(), direct.parameters()):
        assert torch.allclose(p_fast, p_direct, rtol=1e-4, atol=1e-6)


def test_sil_direct_score_is_used_for_the_grayscale_network():
    algorithm = make_algorithm("SIL", hidden_dim=16, grayscale_model=True)
    assert algorithm._input_linear() is None


class _WrappedMLP(torch.nn.Module):
    """Declares the wrapped MLP's input layer but, in subclasses, breaks the promise that
    input_linear() is all that reads x."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def input_linear(self):
        return self.base.input_linear()


class _ScaledInputMLP(_WrappedMLP):
    """Transforms x before the input layer: the score is not G W there."""

    def forward(self, x):
        return self.base(3.0 * x)


class _InputLayerTwiceMLP(_WrappedMLP):
    """Reads the input layer twice per forward pass."""

    def forward(self, x):
        flat = x.reshape(x.shape[0], -1)
        return self.base(x) + 0.1 * self.base.input_linear()(flat).sum(dim=1, keepdim=True)


class _SkipConnectionMLP(_WrappedMLP):
    """Reads x once through the input layer and once more past it."""

    def forward(self, x):
        return self.base(x) + 0.05 * x.reshape(x.shape[0], -1).sum(dim=1, keepdim=True)


def _frozen_input_layer(base):
    for p in base.input_linear().parameters():
        p.requires_grad_(False)
    return base


@pytest.mark.parametrize("wrap", [_ScaledInputMLP, _InputLayerTwiceMLP, _SkipConnectionMLP])
def test_sil_auto_falls_back_to_the_direct_score_for_networks_that_break_the_input_layer_shortcut(wrap, small_cmnist_batches):
    auto = make_algorithm("SIL", hidden_dim=32, warmup_steps=0, penalty_weight=2e4)
    direct = make_algorithm("SIL", hidden_dim=32, warmup_steps=0, penalty_weight=2e4, score_norm_method="autograd")
    for algorithm in (auto, direct):
        algorithm.network = wrap(algorithm.network)
    with pytest.warns(UserWarning, match="score_norm_method"):
        batches = auto.forward_environments(small_cmnist_batches)
    assert all(b.input_projection is None for b in batches)
    with pytest.warns(UserWarning, match="score_norm_method"):
        penalty_auto = auto.objective(small_cmnist_batches)["penalty"].item()
    penalty_direct = direct.objective(small_cmnist_batches)["penalty"].item()
    assert penalty_direct > 0
    assert penalty_auto == pytest.approx(penalty_direct, rel=1e-3)


def test_sil_with_a_frozen_input_layer_keeps_the_shortcut_and_updates_like_the_direct_score(small_cmnist_batches):
    auto = make_algorithm("SIL", hidden_dim=32, warmup_steps=0, penalty_weight=2e4)
    direct = make_algorithm("SIL", hidden_dim=32, warmup_steps=0, penalty_weight=2e4, score_norm_method="autograd")
    for algorithm in (auto, direct):
        _frozen_input_layer(algorithm.network)
    assert all(b.input_projection is not None for b in auto.forward_environments(small_cmnist_batches))
    frozen_before = auto.network.input_linear().weight.clone()
    for _ in range(2):
        out_auto, out_direct = auto.update(small_cmnist_batches), direct.update(small_cmnist_batches)
        assert out_auto["penalty"] == pytest.approx(out_direct["penalty"], rel=1e-3)
    assert torch.equal(auto.network.input_linear().weight, frozen_before)


def test_sil_takes_the_input_layer_path_for_the_mlp_and_leaves_no_hook_behind(small_cmnist_batches):
    algorithm = make_algorithm("SIL", hidden_dim=32)
    layer = algorithm.network.input_linear()
    batches = algorithm.forward_environments(small_cmnist_batches)
    assert all(b.input_projection is not None and b.input_weight is layer.weight for b in batches)
    assert all(b.input_projection.shape == (512, 32) for b in batches)
    assert not layer._forward_hooks
    with pytest.raises(RuntimeError):
        algorithm.forward_environments([(torch.zeros(4, 3), torch.zeros(4))])  # wrong input shape
    assert not layer._forward_hooks
