"""Shared fixtures: the real data directory and small Colored MNIST subsets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from domainbed_sil.datasets.base import DATA_DIR_ENV
from domainbed_sil.datasets.mnist import ColoredMNIST

REPO_ROOT = Path(__file__).resolve().parent.parent


def _find_data_dir() -> Path:
    candidates = [os.environ.get(DATA_DIR_ENV), REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate)
    raise RuntimeError(f"real MNIST not found: set {DATA_DIR_ENV} to the directory holding MNIST/raw")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _find_data_dir()


def _mini_fixtures_present() -> bool:
    try:
        root = _find_data_dir()
    except RuntimeError:
        return False
    return (root / "PACS_mini").is_dir() and (root / "VLCS_mini").is_dir()


# The real PACS/VLCS samples ship with the project's shared data, not with the repository.
needs_mini_fixtures = pytest.mark.skipif(
    not _mini_fixtures_present(),
    reason=f"PACS_mini and VLCS_mini not found under ${DATA_DIR_ENV} (they come with the shared data folder)",
)


@pytest.fixture(scope="session")
def cmnist(data_dir) -> ColoredMNIST:
    """The real Colored MNIST (25% label noise) of trial seed 0."""
    return ColoredMNIST(data_dir, {}, trial_seed=0)


@pytest.fixture(scope="session")
def small_cmnist_batches(cmnist):
    """The first 512 samples of each training environment: [(x (512, 2, 14, 14), y (512,))] x 2."""
    return [(env.x[:512], env.y[:512]) for env in cmnist.environments[:2]]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
