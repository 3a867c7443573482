"""Risk Extrapolation, V-REx (Krueger et al. 2021): the variance of the environment risks."""
from typing import List

import torch

from domainbed_sil.algorithms import register_algorithm
from domainbed_sil.algorithms.base import EnvBatch, PenalizedAlgorithm
from domainbed_sil.hparams import HParam, log_uniform
from domainbed_sil.penalties import VARIANCE_CONVENTIONS, vrex_penalty

# Colored MNIST: the REx code's defaults; "pairwise" makes the penalty (R_1 - R_2)^2 and
# "sum" makes the risk term R_1 + R_2, exactly the REx script's objective.
_CMNIST_VREX = {
    "hidden_dim": HParam(256),
    "l2_weight": HParam(0.001),
    "lr": HParam(0.001),
    "warmup_steps": HParam(100),
    "penalty_weight": HParam(10000.0),
    "env_loss_reduction": HParam("sum"),
    "vrex_variance": HParam("pairwise"),
}


@register_algorithm("VREx")
class VREx(PenalizedAlgorithm):
    """Penalty: variance of the risks; ``vrex_variance`` picks the convention (see penalties.variance).

    The default off Colored MNIST is ``population``, DomainBed's.
    """

    MIN_TRAIN_ENVS = 2
    CHOICES = {"vrex_variance": VARIANCE_CONVENTIONS}
    HPARAMS = {
        "penalty_weight": HParam(10.0, log_uniform(-1, 5)),
        "warmup_steps": HParam(500, lambda r: int(10 ** r.uniform(0, 4))),
        "vrex_variance": HParam("population"),
    }
    DATASET_HPARAMS = {"ColoredMNIST": _CMNIST_VREX, "ColoredMNISTNoFlip": _CMNIST_VREX}

    def penalty(self, batches: List[EnvBatch]) -> torch.Tensor:
        return vrex_penalty(torch.stack([b.risk for b in batches]), self.hparams["vrex_variance"])
