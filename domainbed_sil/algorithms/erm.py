"""Empirical risk minimisation: the penalised objective with no penalty."""
from domainbed_sil.algorithms import register_algorithm
from domainbed_sil.algorithms.base import PenalizedAlgorithm
from domainbed_sil.hparams import HParam

# Colored MNIST: the IRM reference script's ERM row (protocol section 2)
_CMNIST_ERM = {
    "hidden_dim": HParam(256),
    "l2_weight": HParam(0.001),
    "lr": HParam(0.001),
    "env_loss_reduction": HParam("mean"),
}


@register_algorithm("ERM")
class ERM(PenalizedAlgorithm):
    """Minimise the mean (or sum) of the environment risks.

    With ``grayscale_model=True`` and the oracle's hparams this is the grayscale oracle row of
    Tables 1-2 (see ``sweeps/``).
    """

    DATASET_HPARAMS = {"ColoredMNIST": _CMNIST_ERM, "ColoredMNISTNoFlip": _CMNIST_ERM}

    def current_penalty_weight(self) -> float:
        return 0.0
