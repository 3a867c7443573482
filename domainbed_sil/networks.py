"""Networks: the Colored MNIST MLP (and, for image datasets, featurizer + linear head).

``build_network(input_shape, num_classes, hparams)`` picks the architecture named by
``hparams["network"]``.  Binary tasks (``num_classes == 2``) get a single logit, as in the
Colored MNIST protocol (BCE-with-logits); others get ``num_classes`` logits.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn


def num_logits(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


class MLP(nn.Module):
    """392 -> H -> H -> out MLP with ReLU, xavier-uniform weights and zero biases.

    Input ``(N, 2, 14, 14)`` (any shape flattening to ``in_features``, or to twice that when
    ``grayscale`` sums the two colour channels first); output ``(N, out_features)`` logits.
    """

    def __init__(self, in_features: int, hidden_dim: int, out_features: int, grayscale: bool = False):
        super().__init__()
        self.grayscale = grayscale
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_features),
        )
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def input_linear(self) -> Optional[nn.Linear]:
        """The layer that the flattened input enters, and the only thing that reads the input.

        None for the grayscale variant, whose input is summed over the two channels first.
        SIL uses it to compute its score norm without forming the input gradient.
        """
        return None if self.grayscale else self.layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grayscale:
            x = x.reshape(x.shape[0], 2, -1).sum(dim=1)
        return self.layers(x.reshape(x.shape[0], -1))


def build_mlp(input_shape: Sequence[int], num_classes: int, hparams: Mapping[str, Any]) -> nn.Module:
    hidden = hparams["hidden_dim"]
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hparam 'hidden_dim' must be a positive integer, got {hidden!r}")
    in_features = 1
    for d in input_shape:
        in_features *= d
    grayscale = bool(hparams.get("grayscale_model", False))
    if grayscale:
        if input_shape[0] != 2:
            raise ValueError(f"grayscale_model needs a 2-channel input, got shape {tuple(input_shape)}")
        in_features //= 2
    return MLP(in_features, hidden, num_logits(num_classes), grayscale=grayscale)


NETWORK_BUILDERS: Dict[str, Callable[[Sequence[int], int, Mapping[str, Any]], nn.Module]] = {
    "mlp": build_mlp,
}


def build_network(input_shape: Sequence[int], num_classes: int, hparams: Mapping[str, Any]) -> nn.Module:
    name = hparams.get("network", "mlp")
    if name not in NETWORK_BUILDERS:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(sorted(NETWORK_BUILDERS))}")
    return NETWORK_BUILDERS[name](input_shape, num_classes, hparams)


def squared_l2_norm(parameters) -> torch.Tensor:
    """sum over all parameters (weights and biases) of ||p||^2, the protocol's explicit L2 term."""
    return torch.stack([p.pow(2).sum() for p in parameters]).sum()


# AlexNet / ResNet featurizers register themselves into NETWORK_BUILDERS (kept in their own module)
from domainbed_sil import image_networks  # noqa: E402,F401
