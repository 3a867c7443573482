"""Hyperparameter specifications, defaults and deterministic random search.

A hyperparameter is declared once, as an :class:`HParam` (its default and, when it is
searched, a sampler).  Specs come from three places, merged in this order, later ones
winning:

1. ``COMMON_HPARAMS`` below (the training loop's own knobs);
2. the dataset class's ``HPARAMS`` (e.g. batch size, network);
3. the algorithm class's ``HPARAMS`` along its MRO (base classes first), then its
   ``DATASET_HPARAMS[dataset_name]`` (the protocol's per-row values, e.g. Colored MNIST).

So a new algorithm declares its hyperparameters in its own module and nothing here changes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

Sampler = Callable[[np.random.RandomState], Any]


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default and, when it is part of random search, a sampler."""

    default: Any
    sample: Optional[Sampler] = None


def log_uniform(low_exp: float, high_exp: float) -> Sampler:
    """10 ** U(low_exp, high_exp)."""
    return lambda rng: float(10 ** rng.uniform(low_exp, high_exp))


def int_uniform(low: int, high: int) -> Sampler:
    """Integer uniform on the closed interval [low, high]."""
    return lambda rng: int(rng.randint(low, high + 1))


def choice(values) -> Sampler:
    values = list(values)
    return lambda rng: values[int(rng.randint(len(values)))]


COMMON_HPARAMS: Dict[str, HParam] = {
    "lr": HParam(1e-3, log_uniform(-4.5, -2.5)),
    "optimizer": HParam("adam"),
    "weight_decay": HParam(0.0),
    # explicit l2_weight * sum ||p||^2 over all parameters, as in the Colored MNIST scripts
    "l2_weight": HParam(0.0),
    # 0 = full batch: every step uses each training environment whole
    "batch_size": HParam(0),
    # how the per-environment risks are combined: "mean" (IRM script) or "sum" (REx script, SIL eq. 3)
    "env_loss_reduction": HParam("mean"),
}


def seed_hash(*args: Any) -> int:
    """A deterministic 31-bit seed from any JSON-able arguments (stable across processes)."""
    digest = hashlib.md5(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()
    return int(digest, 16) % (2**31)


def hparam_spec(algorithm_class: type, dataset_class: type) -> Dict[str, HParam]:
    """The merged specification for an (algorithm, dataset) pair (see module docstring)."""
    spec: Dict[str, HParam] = dict(COMMON_HPARAMS)
    spec.update(getattr(dataset_class, "HPARAMS", {}))
    for klass in reversed(algorithm_class.__mro__):
        spec.update(vars(klass).get("HPARAMS", {}))
    spec.update(getattr(algorithm_class, "DATASET_HPARAMS", {}).get(dataset_class.NAME, {}))
    return spec


def default_hparams(algorithm_class: type, dataset_class: type) -> Dict[str, Any]:
    return {name: h.default for name, h in sorted(hparam_spec(algorithm_class, dataset_class).items())}


def random_hparams(algorithm_class: type, dataset_class: type, hparams_seed: int, trial_seed: int) -> Dict[str, Any]:
    """Defaults for ``hparams_seed == 0`` (DomainBed's convention), else a random draw.

    Each searched hyperparameter gets its own generator seeded from (hparams_seed,
    trial_seed, name), so adding a hyperparameter never changes the draws of the others.
    """
    spec = hparam_spec(algorithm_class, dataset_class)
    if hparams_seed == 0:
        return {name: h.default for name, h in sorted(spec.items())}
    drawn = {}
    for name, h in sorted(spec.items()):
        if h.sample is None:
            drawn[name] = h.default
        else:
            drawn[name] = h.sample(np.random.RandomState(seed_hash(hparams_seed, trial_seed, name)))
    return drawn


def _type_matches(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if default is None:
        return True
    return isinstance(value, type(default))


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    """The ``--hparams`` JSON object (``{}`` when empty); a ValueError naming what was expected."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--hparams is not valid JSON ({err.msg} at char {err.pos}); expected an object like '{{\"lr\": 0.001}}'")
    if not isinstance(value, dict):
        raise ValueError(f"--hparams must be a JSON object like '{{\"lr\": 0.001}}', got {type(value).__name__}")
    return value


def apply_overrides(hparams: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """``hparams`` updated with ``overrides``; an unknown name or a wrong type is a ValueError."""
    merged = dict(hparams)
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ValueError(f"unknown hparam(s) {unknown}; valid names: {sorted(hparams)}")
    for name, value in overrides.items():
        default = hparams[name]
        if not _type_matches(value, default):
            raise ValueError(
                f"hparam {name!r} expects a value of type {type(default).__name__} like {default!r}, got {value!r}"
            )
        merged[name] = float(value) if isinstance(default, float) else value
    return merged
