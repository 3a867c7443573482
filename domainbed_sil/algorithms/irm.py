"""Invariant Risk Minimization, IRMv1 (Arjovsky et al. 2019)."""
from typing import List

import torch

from domainbed_sil.algorithms import register_algorithm
from domainbed_sil.algorithms.base import EnvBatch, PenalizedAlgorithm
from domainbed_sil.hparams import HParam, log_uniform
from domainbed_sil.penalties import irm_penalty

# Colored MNIST: the IRM reference script's tuned values (protocol section 2)
_CMNIST_IRM = {
    "hidden_dim": HParam(390),
    "l2_weight": HParam(0.00110794568),
    "lr": HParam(0.0004898536566546834),
    "warmup_steps": HParam(190),
    "penalty_weight": HParam(91257.18613115903),
    "env_loss_reduction": HParam("mean"),
}


@register_algorithm("IRM")
class IRM(PenalizedAlgorithm):
    """Penalty: mean over environments of the squared gradient of R_e w.r.t. a dummy logit scale.

    ``irm_estimator``: ``full`` (whole batch squared gradient, Arjovsky's script), ``two_halves``
    (DomainBed's minibatch estimate) or ``auto`` (full for full-batch training, else two halves).
    """

    HPARAMS = {
        "penalty_weight": HParam(100.0, log_uniform(-1, 5)),
        "warmup_steps": HParam(500, lambda r: int(10 ** r.uniform(0, 4))),
        "irm_estimator": HParam("auto"),
    }
    CHOICES = {"irm_estimator": ("auto", "full", "two_halves")}
    DATASET_HPARAMS = {"ColoredMNIST": _CMNIST_IRM, "ColoredMNISTNoFlip": _CMNIST_IRM}

    def estimator(self) -> str:
        chosen = self.hparams["irm_estimator"]
        if chosen == "auto":
            return "full" if self.hparams["batch_size"] == 0 else "two_halves"
        return chosen

    def penalty(self, batches: List[EnvBatch]) -> torch.Tensor:
        estimator = self.estimator()
        return torch.stack([irm_penalty(b.logits, b.y, estimator) for b in batches]).mean()
