"""The algorithm contract and the penalised-risk objective shared by ERM, IRM, V-REx and SIL."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from domainbed_sil.hparams import HParam
from domainbed_sil.networks import build_network, squared_l2_norm
from domainbed_sil.penalties import classification_loss

Minibatches = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def build_optimizer(parameters, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam (Colored MNIST protocol) or SGD with momentum / Nesterov (PACS, VLCS protocol)."""
    name = hparams.get("optimizer", "adam")
    lr, weight_decay = hparams["lr"], hparams.get("weight_decay", 0.0)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        momentum = hparams.get("momentum", 0.9)
        return torch.optim.SGD(
            parameters, lr=lr, momentum=momentum, nesterov=hparams.get("nesterov", momentum > 0),
            weight_decay=weight_decay,
        )
    raise ValueError(f"hparam 'optimizer' must be 'adam' or 'sgd', got {name!r}")


def learning_rate(hparams: Mapping[str, Any], step: int) -> float:
    """The lr for update ``step`` (0-based): ``lr``, times ``lr_decay_factor`` (default 0.1) from
    ``lr_decay_at_step`` on (the PACS/VLCS protocol's step at epoch 24 of 30; 0 or absent = never).

    A pure function of the update count, so it needs no state of its own in checkpoints and
    survives an optimizer reset at the warmup boundary.
    """
    decay_at = hparams.get("lr_decay_at_step", 0)
    if decay_at < 0:
        raise ValueError(f"hparam 'lr_decay_at_step' is {decay_at}: 'auto' (-1) must be resolved by the dataset first")
    if decay_at and step >= decay_at:
        return hparams["lr"] * hparams.get("lr_decay_factor", 0.1)
    return hparams["lr"]


class Algorithm(nn.Module):
    """``Algorithm(input_shape, num_classes, num_domains, hparams)``.

    ``update(minibatches)`` takes one ``(x, y)`` per training environment (``x`` of shape
    ``(N, *input_shape)``, ``y`` of shape ``(N,)``), takes one optimizer step and returns
    floats to log.  ``predict(x)`` returns logits ``(N, 1)`` (binary) or ``(N, C)``.
    The algorithm owns its optimizer and its update counter; both are in
    ``checkpoint_state()``.
    """

    HPARAMS: ClassVar[Dict[str, HParam]] = {}
    # protocol values per registered dataset name, e.g. {"ColoredMNIST": {"lr": HParam(...)}}
    DATASET_HPARAMS: ClassVar[Dict[str, Dict[str, HParam]]] = {}
    NAME: ClassVar[str] = ""
    # allowed values of string hparams, merged along the MRO and checked at construction
    CHOICES: ClassVar[Dict[str, Tuple[str, ...]]] = {"optimizer": ("adam", "sgd")}
    # training environments the algorithm needs (a variance across environments needs two)
    MIN_TRAIN_ENVS: ClassVar[int] = 1
    # hparams that choose how a number is computed, not which number (e.g. SIL's
    # score_norm_method): left out of a run's identity, so a run resumes whatever their value
    IMPLEMENTATION_HPARAMS: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, input_shape: Sequence[int], num_classes: int, num_domains: int, hparams: Mapping[str, Any]):
        super().__init__()
        self._check_hparams(hparams, num_domains)
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.hparams = dict(hparams)
        self.network = build_network(self.input_shape, num_classes, self.hparams)
        self.optimizer = build_optimizer(self.network.parameters(), self.hparams)
        self.update_count = 0

    @classmethod
    def _check_hparams(cls, hparams: Mapping[str, Any], num_domains: int) -> None:
        """ValueError (one line) for an hparam outside its choices or too few environments."""
        if num_domains < cls.MIN_TRAIN_ENVS:
            raise ValueError(f"{cls.NAME or cls.__name__} needs at least {cls.MIN_TRAIN_ENVS} training environments, got {num_domains}")
        for klass in reversed(cls.__mro__):
            for name, allowed in vars(klass).get("CHOICES", {}).items():
                if name in hparams and hparams[name] not in allowed:
                    raise ValueError(f"hparam {name!r} must be one of {list(allowed)}, got {hparams[name]!r}")

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def checkpoint_state(self) -> Dict[str, Any]:
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict(), "update_count": self.update_count}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.update_count = int(state["update_count"])


@dataclass
class EnvBatch:
    """What one environment's forward pass produced.

    ``x`` ``(N, ...)`` (requires grad when the algorithm needs input gradients), ``y`` ``(N,)``,
    ``logits`` ``(N, K)``, ``risk`` scalar mean loss (nats); ``input_projection`` ``(N, H)``, the
    output of the network's input layer, and ``input_weight`` ``(H, D)``, that layer's weight,
    for algorithms that ask for them (SIL), else None.
    """

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    risk: torch.Tensor
    input_projection: Optional[torch.Tensor] = None
    input_weight: Optional[torch.Tensor] = None


class PenalizedAlgorithm(Algorithm):
    """Objective  combine_e(R_e) + l2_weight * sum ||p||^2 + w_t * penalty,  divided by w_t if w_t > 1.

    ``w_t`` is 1 for ``update_count < warmup_steps`` and ``penalty_weight`` afterwards (the IRM
    and REx reference scripts' schedule).  Subclasses implement ``penalty(batches)``; an
    algorithm with no penalty returns ``None``.
    """

    HPARAMS = {
        "penalty_weight": HParam(0.0),
        "warmup_steps": HParam(0),
        # divide the whole loss by the penalty weight when it exceeds 1 (keeps the gradient scale)
        "rescale_loss": HParam(True),
        # DomainBed resets Adam when the penalty switches on; the Arjovsky protocol does not
        "reset_optimizer_at_warmup": HParam(False),
    }
    NEEDS_INPUT_GRAD: ClassVar[bool] = False
    CHOICES = {"env_loss_reduction": ("mean", "sum")}

    def penalty(self, batches: List[EnvBatch]) -> Optional[torch.Tensor]:
        return None

    def current_penalty_weight(self) -> float:
        if self.update_count < self.hparams["warmup_steps"]:
            return 1.0
        return float(self.hparams["penalty_weight"])

    def forward_environments(self, minibatches: Minibatches) -> List[EnvBatch]:
        """One forward pass per environment, so that R_e depends on env e's samples only."""
        batches = []
        for x, y in minibatches:
            if self.NEEDS_INPUT_GRAD:
                x = x.detach().requires_grad_(True)  # a view: no copy of the data
            logits = self.network(x)
            batches.append(EnvBatch(x, y, logits, classification_loss(logits, y)))
        return batches

    def combine_risks(self, risks: torch.Tensor) -> torch.Tensor:
        how = self.hparams["env_loss_reduction"]
        if how == "mean":
            return risks.mean()
        if how == "sum":
            return risks.sum()
        raise ValueError(f"hparam 'env_loss_reduction' must be 'mean' or 'sum', got {how!r}")

    def objective(self, minibatches: Minibatches) -> Dict[str, torch.Tensor]:
        """The loss to minimise at the current step, with its parts (no optimizer step)."""
        batches = self.forward_environments(minibatches)
        nll = self.combine_risks(torch.stack([b.risk for b in batches]))
        loss = nll
        l2_weight = self.hparams["l2_weight"]
        if l2_weight:
            loss = loss + l2_weight * squared_l2_norm(self.network.parameters())
        weight = self.current_penalty_weight()
        penalty = self.penalty(batches)
        if penalty is None:
            penalty = torch.zeros((), device=nll.device)
        elif weight:
            loss = loss + weight * penalty
        if weight > 1.0 and self.hparams["rescale_loss"]:
            loss = loss / weight
        return {"loss": loss, "nll": nll, "penalty": penalty}

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        warmup = self.hparams["warmup_steps"]
        if self.hparams["reset_optimizer_at_warmup"] and warmup > 0 and self.update_count == warmup:
            self.optimizer = build_optimizer(self.network.parameters(), self.hparams)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.hparams, self.update_count)
        parts = self.objective(minibatches)
        self.optimizer.zero_grad(set_to_none=True)
        # inputs=: only parameter gradients; SIL's inputs require grad, and their gradient
        # (a full N x 392 matmul through the first layer) would be computed and thrown away
        # (frozen parameters left out: backward refuses inputs that do not require grad)
        parts["loss"].backward(inputs=[p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad])
        self.optimizer.step()
        weight = self.current_penalty_weight()
        self.update_count += 1
        # one device synchronisation for all logged values
        values = torch.stack([parts["loss"].detach(), parts["nll"].detach(), parts["penalty"].detach().float()]).tolist()
        return {"loss": values[0], "nll": values[1], "penalty": values[2], "penalty_weight": weight}
