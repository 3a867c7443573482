"""Image featurizers for PACS / VLCS: AlexNet (the JiGen protocol) and ResNet-18/50 (DomainBed's).

Every network here is ``featurizer -> nn.Linear(n_features, num_classes)``; input
``(N, 3, H, W)`` normalised images, output ``(N, num_classes)`` logits.

With ``hparams["pretrained"]`` (on by default for the image datasets) the featurizer gets
torchvision's ImageNet weights, read from torch's hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``, default ``~/.cache/torch/hub/checkpoints``) or
downloaded there.  When neither works the build fails with :class:`PretrainedWeightsError`
naming the file to pre-place; it never falls back to random weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence

import torch
import torchvision
from torch import nn

from domainbed_sil.networks import NETWORK_BUILDERS, num_logits


class PretrainedWeightsError(ValueError):
    """ImageNet weights were asked for and could not be loaded."""


@dataclass(frozen=True)
class Architecture:
    """A torchvision model, its ImageNet weights and how to cut its classifier off."""

    constructor: Callable[..., nn.Module]
    weights: Any  # a torchvision WeightsEnum member
    n_features: int
    strip: Callable[[nn.Module], nn.Module]
    min_image_size: int


def _strip_alexnet(model: nn.Module) -> nn.Module:
    # remove only the final 4096 -> 1000 layer: features end at fc7 (after its ReLU), as in JiGen
    model.classifier = nn.Sequential(*list(model.classifier.children())[:-1])
    return model


def _strip_resnet(model: nn.Module) -> nn.Module:
    model.fc = nn.Identity()
    return model


ARCHITECTURES: Dict[str, Architecture] = {
    "alexnet": Architecture(torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
                            4096, _strip_alexnet, 63),
    "resnet18": Architecture(torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                             512, _strip_resnet, 32),
    "resnet50": Architecture(torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                             2048, _strip_resnet, 32),
}


def weights_path(name: str) -> Path:
    """Where torch looks for the ImageNet checkpoint of ``name`` before downloading it."""
    url = ARCHITECTURES[name].weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _missing_weights_message(name: str, err: BaseException) -> str:
    arch = ARCHITECTURES[name]
    return (
        f"cannot load ImageNet weights for {name!r} ({type(err).__name__}: {err}). "
        f"Pre-place the file {weights_path(name)} (download {arch.weights.url} on a machine with "
        f"internet; set TORCH_HOME to use another cache directory), "
        f"or train from random weights with --hparams '{{\"pretrained\": false}}'"
    )


def load_imagenet_state(name: str) -> Dict[str, torch.Tensor]:
    """The ImageNet state dict of ``name`` from the hub cache (downloading it if possible).

    Raises PretrainedWeightsError with the path to pre-place when it cannot be had.
    """
    arch = ARCHITECTURES[name]
    try:
        return arch.weights.get_state_dict(progress=False)
    except Exception as err:  # URLError, OSError, corrupt file (RuntimeError, pickle errors) ...
        raise PretrainedWeightsError(_missing_weights_message(name, err)) from err


def check_pretrained_available(hparams: Mapping[str, Any]) -> None:
    """Fail early (before a run scans its image folders) when ``hparams`` asks for weights that
    are neither in the hub cache nor downloadable.

    A cached file is not read here: building the network loads it once, and a corrupt file
    fails there with the same PretrainedWeightsError (still before the run writes anything).
    """
    name = hparams.get("network")
    if name in ARCHITECTURES and hparams.get("pretrained", False) and not weights_path(name).is_file():
        load_imagenet_state(name)


class FeaturizerClassifier(nn.Module):
    """``featurizer`` (N, 3, H, W) -> (N, n_features), then a linear layer to (N, num_classes)."""

    def __init__(self, featurizer: nn.Module, n_features: int, num_classes: int):
        super().__init__()
        self.featurizer = featurizer
        self.classifier = nn.Linear(n_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))


def build_image_network(name: str, input_shape: Sequence[int], num_classes: int,
                        hparams: Mapping[str, Any]) -> nn.Module:
    """``name`` featurizer (ImageNet weights when ``hparams["pretrained"]``) + linear head."""
    arch = ARCHITECTURES[name]
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise ValueError(f"network {name!r} expects RGB images of shape (3, H, W), got {tuple(input_shape)}")
    if min(input_shape[1:]) < arch.min_image_size:
        raise ValueError(f"network {name!r} needs images of at least {arch.min_image_size} pixels, "
                         f"got {tuple(input_shape[1:])}; raise hparam 'image_size'")
    model = arch.constructor(weights=None)
    if hparams.get("pretrained", False):
        model.load_state_dict(load_imagenet_state(name))
    return FeaturizerClassifier(arch.strip(model), arch.n_features, num_logits(num_classes))


def _builder(name: str):
    def build(input_shape: Sequence[int], num_classes: int, hparams: Mapping[str, Any]) -> nn.Module:
        return build_image_network(name, input_shape, num_classes, hparams)

    build.__name__ = f"build_{name}"
    return build


for _name in ARCHITECTURES:
    NETWORK_BUILDERS[_name] = _builder(_name)
