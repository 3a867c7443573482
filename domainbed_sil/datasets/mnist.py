"""MNIST from raw IDX files, and the Arjovsky et al. (2019) Colored MNIST built from it."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from domainbed_sil.datasets import register_dataset
from domainbed_sil.datasets.base import DomainDataset, TensorEnvironment
from domainbed_sil.hparams import HParam

# md5 of the *decompressed* IDX bytes: the .gz bytes differ between mirrors, these do not.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFileError(ValueError):
    """A data file that is missing, corrupt or fails its checksum."""


def mnist_raw_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _read_verified(raw_dir: Path, name: str) -> bytes:
    """The decompressed bytes of ``name`` (plain, else ``name.gz``), md5-checked."""
    plain, packed = raw_dir / name, raw_dir / f"{name}.gz"
    if plain.exists():
        path, data = plain, plain.read_bytes()
    elif packed.exists():
        path = packed
        try:
            data = gzip.decompress(packed.read_bytes())
        except (OSError, EOFError) as err:
            raise DataFileError(f"{packed}: not a readable gzip file ({err}); delete it and download again") from err
    else:
        raise DataFileError(
            f"missing MNIST file {plain} (or {packed.name}); "
            f"run `python -m domainbed_sil.download mnist --data_dir {Path(raw_dir).parent.parent}`"
        )
    actual = hashlib.md5(data).hexdigest()
    if actual != MNIST_MD5[name]:
        raise DataFileError(f"{path}: md5 of decompressed bytes is {actual}, expected {MNIST_MD5[name]}")
    return data


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an IDX file (magic 0x0000 <dtype> <ndim>, big-endian dims, then the array)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFileError("not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataFileError(f"IDX payload is {len(data) - offset} bytes, dims {dims} need {expected}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def load_mnist(data_dir: Path, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 from ``<data_dir>/MNIST/raw``.

    ``split`` is ``"train"`` (60,000) or ``"t10k"`` (10,000).
    """
    if split not in ("train", "t10k"):
        raise ValueError(f"MNIST split must be 'train' or 't10k', got {split!r}")
    raw = mnist_raw_dir(data_dir)
    if not Path(data_dir).is_dir():
        raise DataFileError(f"data directory {data_dir} does not exist; pass --data_dir or set DOMAINBED_SIL_DATA")
    images = parse_idx(_read_verified(raw, f"{split}-images-idx3-ubyte"))
    labels = parse_idx(_read_verified(raw, f"{split}-labels-idx1-ubyte"))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _bernoulli(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < p).long()


def make_colored_environment(
    images: torch.Tensor, digits: torch.Tensor, color_flip: float, label_flip: float, generator: torch.Generator
) -> TensorEnvironment:
    """One Colored MNIST environment (Arjovsky et al. 2019, protocol section 2).

    Args:
        images: ``(N, 28, 28)`` uint8.
        digits: ``(N,)`` digit labels 0..9.
        color_flip: probability that the colour disagrees with the (noisy) label.
        label_flip: probability that the binary label ``digit < 5`` is flipped.
    Returns:
        x ``(N, 2, 14, 14)`` float32 in [0, 1] with the channel ``1 - colour`` zeroed; y ``(N,)``
        float32 in {0, 1}.
    """
    small = images[:, ::2, ::2].float() / 255.0
    labels = (digits < 5).long() ^ _bernoulli(label_flip, len(digits), generator)
    colors = labels ^ _bernoulli(color_flip, len(digits), generator)
    x = torch.stack([small, small], dim=1)
    x[torch.arange(len(x)), 1 - colors] = 0.0
    return TensorEnvironment(x.contiguous(), labels.float())


@register_dataset("ColoredMNIST")
class ColoredMNIST(DomainDataset):
    """Arjovsky et al. Colored MNIST with 25% label noise (paper Table 1).

    Environments: two training envs from MNIST-train images 0..49,999 shuffled by the trial
    seed (even / odd positions, colour flip 0.2 / 0.1, 25,000 each) and a test env from images
    50,000..59,999 (colour flip 0.9).  Built from the trial seed only.
    """

    ENVIRONMENTS = ["+80%", "+90%", "-90%"]
    COLOR_FLIPS = (0.2, 0.1, 0.9)
    LABEL_FLIP = 0.25
    INPUT_SHAPE = (2, 14, 14)
    NUM_CLASSES = 2
    N_STEPS = 501
    CHECKPOINT_FREQ = 100
    DEFAULT_TEST_ENVS = [2]
    # The protocol trains on all 25,000 samples of each env and reports the final step.
    HOLDOUT_FRACTION = 0.0
    HPARAMS: Dict[str, HParam] = {
        "network": HParam("mlp"),
        "hidden_dim": HParam(256, lambda r: int(r.randint(256, 513))),
        # the oracle of Tables 1-2: sums the two colour channels, so it cannot see colour
        "grayscale_model": HParam(False),
        "l2_weight": HParam(0.001),
        # samples kept per training env (first k of each shuffled half); 25,000 is the protocol,
        # smaller values make the 2-core quick sweeps cheaper without changing the construction
        "train_env_size": HParam(25_000),
    }

    def __init__(self, data_dir: Path, hparams: Mapping[str, Any], trial_seed: int, test_envs: Sequence[int] = (2,),
                 holdout_fraction: Optional[float] = None):
        super().__init__(data_dir, hparams, trial_seed, test_envs, holdout_fraction)
        size = self.hparams.get("train_env_size", 25_000)
        if not isinstance(size, int) or not 1 <= size <= 25_000:
            raise ValueError(f"hparam 'train_env_size' must be an integer in 1..25000, got {size!r}")
        images, digits = load_mnist(data_dir, "train")
        generator = torch.Generator().manual_seed(trial_seed)
        order = torch.randperm(50_000, generator=generator)
        pool_images, pool_digits = images[:50_000][order], digits[:50_000][order]
        parts = [
            (pool_images[0::2], pool_digits[0::2]),
            (pool_images[1::2], pool_digits[1::2]),
            (images[50_000:], digits[50_000:]),
        ]
        envs = [make_colored_environment(im, dg, flip, self.LABEL_FLIP, generator) for (im, dg), flip in zip(parts, self.COLOR_FLIPS)]
        # built whole, then cut: a smaller train_env_size is a prefix of the protocol's envs
        self.environments = [TensorEnvironment(e.x[:size], e.y[:size]) for e in envs[:2]] + [envs[2]]


@register_dataset("ColoredMNISTNoFlip")
class ColoredMNISTNoFlip(ColoredMNIST):
    """The same construction without label noise (paper Table 2)."""

    LABEL_FLIP = 0.0
