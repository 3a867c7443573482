"""The dataset contract and the tensor-resident environment used by full-batch datasets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Subset

DATA_DIR_ENV = "DOMAINBED_SIL_DATA"


def resolve_data_dir(flag: Optional[str]) -> Path:
    """``--data_dir`` if given, else ``$DOMAINBED_SIL_DATA``, else ``./data``."""
    return Path(flag or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


class TensorEnvironment(Dataset):
    """One environment held as two tensors, so that full-batch training needs no DataLoader.

    Attributes:
        x: ``(N, ...)`` float inputs.
        y: ``(N,)`` labels.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def to(self, device) -> "TensorEnvironment":
        return TensorEnvironment(self.x.to(device), self.y.to(device))


def subset(env: Dataset, indices: torch.Tensor) -> Dataset:
    """Rows ``indices`` of ``env``; stays a TensorEnvironment (a gather, not a view) when it was one."""
    if isinstance(env, TensorEnvironment):
        return TensorEnvironment(env.x[indices], env.y[indices])
    return Subset(env, indices.tolist())


def split_environment(env: Dataset, holdout_fraction: float, seed: int) -> Tuple[Dataset, Optional[Dataset]]:
    """(in split, out split) with ``round(holdout_fraction * len)`` random rows held out.

    ``holdout_fraction == 0`` returns the whole environment and ``None``.  The permutation
    depends only on ``seed``, so every algorithm sees the same split for the same trial.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    n_out = int(round(holdout_fraction * len(env)))
    if n_out == 0:
        return env, None
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(env), generator=generator)
    return subset(env, order[n_out:].sort().values), subset(env, order[:n_out].sort().values)


def _require_tensor_env(split: Dataset) -> TensorEnvironment:
    if not isinstance(split, TensorEnvironment):
        raise TypeError(f"the default batching needs TensorEnvironment splits, got {type(split).__name__}")
    return split


class DomainDataset:
    """A multi-environment dataset.

    Subclasses set the class attributes and fill ``self.environments`` (one torch Dataset per
    environment, in ``ENVIRONMENTS`` order) in ``__init__(data_dir, hparams, trial_seed,
    test_envs)``.  Environments must not depend on the algorithm: only on the data,
    ``trial_seed`` and ``test_envs``.
    """

    ENVIRONMENTS: ClassVar[List[str]] = []
    INPUT_SHAPE: ClassVar[Tuple[int, ...]] = ()
    NUM_CLASSES: ClassVar[int] = 0
    N_STEPS: ClassVar[int] = 5001
    CHECKPOINT_FREQ: ClassVar[int] = 100
    DEFAULT_TEST_ENVS: ClassVar[List[int]] = [0]
    HOLDOUT_FRACTION: ClassVar[float] = 0.2
    HPARAMS: ClassVar[Dict[str, Any]] = {}

    def __init__(self, data_dir: Path, hparams: Mapping[str, Any], trial_seed: int, test_envs: Sequence[int] = (),
                 holdout_fraction: Optional[float] = None):
        self.data_dir = Path(data_dir)
        self.hparams = dict(hparams)
        self.trial_seed = trial_seed
        self.test_envs = list(test_envs)
        # the run's out-split fraction (train.py splits with the same value); epoch-based
        # defaults (images) count only the in-split
        self.holdout_fraction = self.HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction
        self.environments: List[Dataset] = []

    def resolve_hparams(self, hparams: Mapping[str, Any]) -> Dict[str, Any]:
        """``hparams`` with values that depend on the loaded data filled in (e.g. a step count
        derived from epochs); train.py passes the result to the algorithm and the records."""
        return dict(hparams)

    def default_steps(self) -> int:
        """Steps when ``--steps`` is not given (image datasets derive it from epochs and sizes)."""
        return self.N_STEPS

    def default_checkpoint_freq(self) -> int:
        return self.CHECKPOINT_FREQ

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return self.INPUT_SHAPE

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    def __len__(self) -> int:
        return len(self.environments)

    def __getitem__(self, i: int) -> Dataset:
        return self.environments[i]

    def minibatches(
        self, train_splits: Sequence[Dataset], batch_size: int, device: torch.device, generator: torch.Generator
    ) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Endless ``[(x_e, y_e) for each training split]``, equal batch sizes across environments.

        ``batch_size == 0`` means full batch.  All randomness comes from ``generator`` (CPU), so
        a run resumed with the generator's saved state continues the same sequence.  This
        default serves tensor-resident environments; datasets read from files override it.
        """
        envs = [_require_tensor_env(split) for split in train_splits]
        envs = [e if e.x.device == device else e.to(device) for e in envs]
        if batch_size == 0:
            batch = [(e.x, e.y) for e in envs]
            while True:
                yield batch
        while True:
            picks = [torch.randperm(len(e), generator=generator)[:batch_size].to(device) for e in envs]
            yield [(e.x[idx], e.y[idx]) for e, idx in zip(envs, picks)]

    def eval_batches(self, split: Dataset, device: torch.device, batch_size: int = 8192):
        """``(x, y)`` chunks covering ``split`` once, for accuracy at checkpoints."""
        env = _require_tensor_env(split)
        for start in range(0, len(env), batch_size):
            yield env.x[start : start + batch_size].to(device), env.y[start : start + batch_size].to(device)

    @classmethod
    def check_test_envs(cls, test_envs: Sequence[int]) -> None:
        """ValueError naming the valid range when an index is out of it or no env is left to train on."""
        n = len(cls.ENVIRONMENTS)
        bad = [e for e in test_envs if not 0 <= e < n]
        if bad:
            raise ValueError(
                f"test env index {bad[0]} out of range for {cls.__name__}: "
                f"expected 0..{n - 1} ({', '.join(f'{i}={name}' for i, name in enumerate(cls.ENVIRONMENTS))})"
            )
        if len(set(test_envs)) != len(test_envs):
            raise ValueError(f"test envs {list(test_envs)} name an environment twice; expected distinct indices")
        if len(set(test_envs)) >= n:
            raise ValueError(f"test envs {list(test_envs)} leave no training environment in {cls.__name__}")
