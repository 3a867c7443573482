"""PACS and VLCS read from DomainBed's folder layout, with the Carlucci et al. (JiGen) protocol.

Layout: ``<data_dir>/<root>/<domain>/<class>/<image>`` where ``<root>`` is ``PACS`` / ``VLCS``
(or ``hparams["data_subdir"]``, e.g. ``PACS_mini`` for the test fixtures).  A domain folder may
instead hold the official VLCS split, ``<domain>/full/<class>/`` and ``<domain>/test/<class>/``:
then a test domain is its ``test/`` images (the protocol's 30% split) and a source domain its
``full/`` images.  Class folders are named by class or by index (``0`` .. ``K-1``, the JiGen
release); indices always come from the fixed alphabetical ``CLASSES`` list, never from the
folders one domain happens to contain.

Loading: one DataLoader per training domain, endless, equal batch sizes, workers from
``$DOMAINBED_SIL_WORKERS`` (default: the CPUs this process may use, at most 8), pinned memory
on CUDA.  Images whose header cannot be read are skipped when the folders are scanned; images
that fail to decode later are replaced by the next image of the split.  Both are counted and
reported with a warning (``dataset.skipped``), never dropped silently.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from domainbed_sil.datasets import register_dataset
from domainbed_sil.datasets.base import DomainDataset
from domainbed_sil.hparams import HParam, choice
from domainbed_sil.cpus import available_cores
from domainbed_sil.image_networks import check_pretrained_available

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
# file-manager droppings, not data: skipped without a message
IGNORED_FILES = frozenset({"Thumbs.db", "desktop.ini"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORMS = ("jigen", "domainbed")
WORKERS_ENV = "DOMAINBED_SIL_WORKERS"
SPLIT_DIRS = ("full", "test")

Sample = Tuple[str, int]  # (image path, class index)


class ImageFolderError(ValueError):
    """The image folders do not have the expected layout."""


def _ignored(entry: Path) -> bool:
    return entry.name.startswith(".") or entry.name in IGNORED_FILES


def _listing(path: Path) -> List[Path]:
    return sorted(p for p in path.iterdir() if not _ignored(p))


def _problem_line(problems: Sequence[str], limit: int = 3) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def class_index(folder_name: str, classes: Sequence[str]) -> Optional[int]:
    """Index of a class folder: its position in ``classes``, or its own value if it is a digit string."""
    if folder_name in classes:
        return list(classes).index(folder_name)
    if folder_name.isdigit() and int(folder_name) < len(classes):
        return int(folder_name)
    return None


def scan_class_folders(folder: Path, classes: Sequence[str]) -> List[Sample]:
    """All ``(path, label)`` under ``folder/<class>/``, sorted by path.

    Raises ImageFolderError naming every stray entry (a file beside the class folders, an unknown
    class folder, a non-image file) and every empty class folder.
    """
    problems: List[str] = []
    samples: List[Sample] = []
    seen: Dict[int, str] = {}
    for entry in _listing(folder):
        if not entry.is_dir():
            problems.append(f"stray file {entry} (expected only class folders {', '.join(classes)})")
            continue
        label = class_index(entry.name, classes)
        if label is None:
            problems.append(f"unknown class folder {entry} (expected one of {', '.join(classes)})")
            continue
        if label in seen:
            problems.append(f"class {classes[label]} appears twice: {seen[label]} and {entry.name}")
            continue
        seen[label] = entry.name
        files = _listing(entry)
        images = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        problems += [f"stray entry {f} (not a {'/'.join(sorted(IMAGE_EXTENSIONS))} image)"
                     for f in files if f not in images]
        if not images:
            problems.append(f"empty class folder {entry}")
        samples += [(str(f), label) for f in images]
    if problems:
        raise ImageFolderError(f"{len(problems)} problem(s) in {folder}: {_problem_line(problems)}")
    return samples


def header_error(path: str) -> Optional[str]:
    """None when PIL can read the image header at ``path``, else the reason (cheap: no decoding)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 -- forces the header parse
        return None
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(err).__name__}: {err}"


def load_rgb(path: str) -> Image.Image:
    """The decoded image as RGB (sketches are grey or palette PNGs)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def build_transforms(kind: str, size: int) -> Tuple[T.Compose, T.Compose]:
    """(train, eval) transforms producing ``(3, size, size)`` float tensors, ImageNet-normalised.

    ``jigen`` (Carlucci et al.): RandomResizedCrop(size, scale 0.8-1.0), RandomGrayscale(0.1).
    ``domainbed`` (Gulrajani & Lopez-Paz): RandomResizedCrop(size, scale 0.7-1.0), horizontal
    flip, ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale(0.1).  Eval: resize to size x size.
    """
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if kind == "jigen":
        augment = [T.RandomResizedCrop(size, scale=(0.8, 1.0)), T.RandomGrayscale(0.1)]
    elif kind == "domainbed":
        augment = [T.RandomResizedCrop(size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                   T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(0.1)]
    else:
        raise ValueError(f"hparam 'transform' must be one of {', '.join(TRANSFORMS)}, got {kind!r}")
    return T.Compose(augment + tail), T.Compose([T.Resize((size, size))] + tail)


class ImageEnvironment(Dataset):
    """One domain: ``samples`` [(path, label)], ``targets`` ``(N,)`` long.

    Indexing returns the eval-transformed image ``(3, S, S)`` and its label; training reads go
    through :class:`TransformedView` with the augmenting transform instead.
    """

    def __init__(self, name: str, samples: Sequence[Sample], eval_transform):
        self.name = name
        self.samples = list(samples)
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.eval_transform(load_rgb(path)), label


class TransformedView(Dataset):
    """Rows ``indices`` of an :class:`ImageEnvironment` under ``transform``.

    An image that fails to decode is replaced by the next one of the view (so every batch keeps
    its size and labels stay paired with their images); items are ``(x, y, skipped)`` where
    ``skipped`` lists ``(path, reason)`` of the images passed over.
    """

    def __init__(self, env: ImageEnvironment, indices: Sequence[int], transform):
        if len(indices) == 0:
            raise ImageFolderError(f"domain {env.name} has no images in this split")
        self.env, self.indices, self.transform = env, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        skipped = []
        for attempt in range(len(self.indices)):
            path, label = self.env.samples[self.indices[(k + attempt) % len(self.indices)]]
            try:
                return self.transform(load_rgb(path)), label, skipped
            except Exception as err:  # decoding errors of any kind: counted, never fatal alone
                skipped.append((path, f"{type(err).__name__}: {err}"))
        raise ImageFolderError(f"no image of domain {self.env.name} can be decoded; first: {skipped[0]}")


def collate_with_skips(items):
    """Batch of ``(x, y, skipped)`` -> ``x (B, 3, S, S)``, ``y (B,)``, all skipped ``(path, reason)``."""
    xs, ys, skipped = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), [s for group in skipped for s in group]


class EndlessBatches(torch.utils.data.Sampler):
    """Endless lists of ``batch_size`` indices in ``range(n)``: successive seeded permutations, cut
    into batches across epoch boundaries (so a domain smaller than a batch still fills it)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        pending: List[int] = []
        while True:
            while len(pending) < self.batch_size:
                pending += torch.randperm(self.n, generator=generator).tolist()
            yield pending[: self.batch_size]
            pending = pending[self.batch_size:]


def loader_workers() -> int:
    """DataLoader worker processes: ``$DOMAINBED_SIL_WORKERS``, else the usable CPUs (at most 8)."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None:
        if not value.isdigit():
            raise ValueError(f"${WORKERS_ENV} must be a non-negative integer, got {value!r}")
        return int(value)
    return min(8, available_cores())


def _unwrap(split: Dataset) -> Tuple[ImageEnvironment, List[int]]:
    """(environment, row indices) of an ImageEnvironment or a Subset of one."""
    if isinstance(split, ImageEnvironment):
        return split, list(range(len(split)))
    if isinstance(split, Subset) and isinstance(split.dataset, ImageEnvironment):
        return split.dataset, list(split.indices)
    raise TypeError(f"expected an ImageEnvironment or a Subset of one, got {type(split).__name__}")


def steps_per_epoch(source_sizes: Sequence[int], batch_size: int, holdout_fraction: float) -> int:
    """Steps for one pass over the smallest source domain's training split (train.py's ``epoch``)."""
    smallest = min(n - int(round(holdout_fraction * n)) for n in source_sizes)
    return max(1, math.ceil(smallest / batch_size))


class ImageDomainDataset(DomainDataset):
    """A leave-one-domain-out image benchmark read from folders (see the module docstring).

    Hyperparameters of the data: ``image_size`` (side in pixels), ``transform`` (``jigen`` |
    ``domainbed``), ``data_subdir`` (folder under data_dir; "" = the dataset name),
    ``allow_missing_domains`` (fixtures only: trailing domain folders may be absent; their
    environments do not exist and cannot be test envs), ``lr_decay_at_step`` (-1 = at epoch
    ``LR_DECAY_EPOCH``, resolved here in the caller's hparams dict so that the algorithm and the
    records see the step used).
    """

    CLASSES: ClassVar[List[str]] = []
    EXPECTED_COUNTS: ClassVar[Dict[str, int]] = {}
    N_EPOCHS: ClassVar[int] = 30
    LR_DECAY_EPOCH: ClassVar[int] = 24
    HOLDOUT_FRACTION = 0.1
    DEFAULT_TEST_ENVS = [0]
    HPARAMS: Dict[str, HParam] = {
        "network": HParam("alexnet"),
        "pretrained": HParam(True),
        "image_size": HParam(225),
        "transform": HParam("jigen"),
        "batch_size": HParam(128, choice([64, 128, 256])),
        "lr": HParam(5e-4, choice([1e-4, 5e-4, 1e-3])),
        "optimizer": HParam("sgd"),
        "momentum": HParam(0.9),
        "nesterov": HParam(True),
        "weight_decay": HParam(5e-4),
        "lr_decay_at_step": HParam(-1),
        "lr_decay_factor": HParam(0.1),
        "data_subdir": HParam(""),
        "allow_missing_domains": HParam(False),
    }

    def __init__(self, data_dir: Path, hparams: Mapping[str, Any], trial_seed: int, test_envs: Sequence[int] = (0,),
                 holdout_fraction: Optional[float] = None):
        super().__init__(data_dir, hparams, trial_seed, test_envs, holdout_fraction)
        self._check_hparams()
        check_pretrained_available(self.hparams)
        self.image_size = self.hparams["image_size"]
        self.train_transform, self.eval_transform = build_transforms(self.hparams["transform"], self.image_size)
        self.root = self.dataset_root(self.data_dir, self.hparams)
        self.environments = self._load_environments()
        self.skipped: Dict[str, str] = {}  # path -> reason, images that failed to decode during loading

    @classmethod
    def dataset_root(cls, data_dir: Path, hparams: Mapping[str, Any]) -> Path:
        subdir = hparams.get("data_subdir") or cls.NAME
        if Path(subdir).is_absolute() or ".." in Path(subdir).parts:
            raise ValueError(f"hparam 'data_subdir' must be a folder name under --data_dir, got {subdir!r}")
        return Path(data_dir) / subdir

    def _check_hparams(self) -> None:
        size, batch = self.hparams["image_size"], self.hparams["batch_size"]
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"hparam 'image_size' must be an integer >= 8 (pixels), got {size!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"hparam 'batch_size' must be a positive integer (images per domain) for "
                             f"{self.NAME}, got {batch!r}")
        if self.hparams["transform"] not in TRANSFORMS:
            raise ValueError(f"hparam 'transform' must be one of {', '.join(TRANSFORMS)}, got {self.hparams['transform']!r}")

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.CLASSES)

    def _domain_folder(self, index: int) -> Path:
        """The folder with the class folders of domain ``index`` (a split folder when present)."""
        domain_dir = self.root / self.ENVIRONMENTS[index]
        if all((domain_dir / s).is_dir() for s in SPLIT_DIRS):
            return domain_dir / ("test" if index in self.test_envs else "full")
        return domain_dir

    def _present_domains(self) -> int:
        """How many environments exist; raises for missing folders (see ``allow_missing_domains``)."""
        if not self.root.is_dir():
            raise ImageFolderError(
                f"dataset folder {self.root} does not exist; run `python -m domainbed_sil.download "
                f"{self.NAME.lower()} --data_dir {self.data_dir}` or pass the right --data_dir")
        present = [(self.root / d).is_dir() for d in self.ENVIRONMENTS]
        missing = [d for d, ok in zip(self.ENVIRONMENTS, present) if not ok]
        n_present = present.index(False) if missing else len(present)
        if missing and not (self.hparams["allow_missing_domains"] and not any(present[n_present:])):
            found = ", ".join(p.name for p in _listing(self.root)) or "nothing"
            hint = ("; allow_missing_domains only allows the last domains to be absent"
                    if self.hparams["allow_missing_domains"] else "")
            raise ImageFolderError(f"missing domain folder(s) {', '.join(missing)} in {self.root} "
                                   f"(expected {', '.join(self.ENVIRONMENTS)}; found {found}){hint}")
        absent_tests = [i for i in self.test_envs if i >= n_present]
        if absent_tests:
            raise ImageFolderError(f"test env {absent_tests[0]} ({self.ENVIRONMENTS[absent_tests[0]]}) "
                                   f"has no folder in {self.root}")
        if n_present - len(set(self.test_envs)) < 1:
            raise ImageFolderError(f"no training domain left in {self.root} with test envs {self.test_envs}")
        return n_present

    def _load_environments(self) -> List[ImageEnvironment]:
        environments = []
        unreadable: List[str] = []
        for i in range(self._present_domains()):
            samples = scan_class_folders(self._domain_folder(i), self.CLASSES)
            errors = [(s, header_error(s[0])) for s in samples]
            unreadable += [f"{path} ({err})" for (path, _), err in errors if err]
            kept = [s for s, err in errors if err is None]
            if not kept:
                raise ImageFolderError(f"no readable image in {self._domain_folder(i)}")
            environments.append(ImageEnvironment(self.ENVIRONMENTS[i], kept, self.eval_transform))
        self.unreadable = unreadable
        if unreadable:
            warnings.warn(f"{self.NAME}: skipped {len(unreadable)} unreadable image(s): {_problem_line(unreadable)}",
                          stacklevel=2)
        if self.NAME == "VLCS":
            for i in self.test_envs:
                if self._domain_folder(i).name != "test":
                    print(f"VLCS: no official test split under {self.root / self.ENVIRONMENTS[i]}; "
                          f"test domain {self.ENVIRONMENTS[i]} is evaluated whole", file=sys.stderr)
        return environments

    def source_sizes(self) -> List[int]:
        return [len(env) for i, env in enumerate(self.environments) if i not in self.test_envs]

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.source_sizes(), self.hparams["batch_size"], self.holdout_fraction)

    def default_steps(self) -> int:
        """``N_EPOCHS`` passes over the smallest source domain (30 in the protocol)."""
        return self.N_EPOCHS * self.steps_per_epoch()

    def default_checkpoint_freq(self) -> int:
        """One evaluation per epoch."""
        return self.steps_per_epoch()

    def resolve_hparams(self, hparams: Mapping[str, Any]) -> Dict[str, Any]:
        """``lr_decay_at_step == -1`` becomes the step of epoch ``LR_DECAY_EPOCH`` (24 of 30)."""
        resolved = dict(hparams)
        if resolved.get("lr_decay_at_step") == -1:
            resolved["lr_decay_at_step"] = self.LR_DECAY_EPOCH * self.steps_per_epoch()
        return resolved

    def _note_skipped(self, skipped: Sequence[Tuple[str, str]]) -> None:
        new = [(p, r) for p, r in skipped if p not in self.skipped]
        for path, reason in new:
            self.skipped[path] = reason
        if new:
            warnings.warn(f"{self.NAME}: {len(new)} image(s) failed to decode and were replaced by others "
                          f"({len(self.skipped)} so far): {_problem_line([f'{p} ({r})' for p, r in new])}",
                          stacklevel=3)

    def _loader_kwargs(self, device: torch.device, workers: int) -> Dict[str, Any]:
        return {"num_workers": workers, "pin_memory": device.type == "cuda", "collate_fn": collate_with_skips}

    def minibatches(self, train_splits: Sequence[Dataset], batch_size: int, device: torch.device,
                    generator: torch.Generator) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Endless ``[(x_e (B, 3, S, S), y_e (B,)) per training domain]``, ``B = batch_size``.

        Each domain has its own endless DataLoader whose order and worker seeds come from one draw
        of ``generator`` when this is called; a resumed run therefore continues with a fresh seeded
        order rather than the exact batches an uninterrupted run would have seen.
        """
        views = [TransformedView(*_unwrap(split), self.train_transform) for split in train_splits]
        workers = loader_workers()
        per_domain = max(1, workers // len(views)) if workers else 0
        iterators = []
        for view in views:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            loader = DataLoader(view, batch_sampler=EndlessBatches(len(view), batch_size, seed),
                                generator=torch.Generator().manual_seed(seed),
                                **self._loader_kwargs(device, per_domain))
            iterators.append(iter(loader))
        while True:
            batch = []
            for iterator in iterators:
                x, y, skipped = next(iterator)
                self._note_skipped(skipped)
                batch.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
            yield batch

    def eval_batches(self, split: Dataset, device: torch.device, batch_size: int = 256):
        """``(x, y)`` chunks covering ``split`` once with the eval transform (resize, normalise)."""
        view = TransformedView(*_unwrap(split), self.eval_transform)
        batch_size = min(batch_size, 256)
        # worker processes start at every evaluation: only worth it when the main process has batches to wait for
        workers = min(loader_workers(), math.ceil(len(view) / batch_size) - 1)
        loader = DataLoader(view, batch_size=batch_size, shuffle=False, **self._loader_kwargs(device, workers))
        for x, y, skipped in loader:
            self._note_skipped(skipped)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@register_dataset("PACS")
class PACS(ImageDomainDataset):
    """PACS (Li et al. 2017): 7 classes, domains art_painting, cartoon, photo, sketch (9,991 images)."""

    ENVIRONMENTS = ["art_painting", "cartoon", "photo", "sketch"]
    CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    EXPECTED_COUNTS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
    INPUT_SHAPE = (3, 225, 225)
    NUM_CLASSES = 7


@register_dataset("VLCS")
class VLCS(ImageDomainDataset):
    """VLCS (Fang et al. 2013): 5 classes, domains Caltech101, LabelMe, SUN09, VOC2007 (10,729 images)."""

    ENVIRONMENTS = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    CLASSES = ["bird", "car", "chair", "dog", "person"]
    EXPECTED_COUNTS = {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376}
    INPUT_SHAPE = (3, 225, 225)
    NUM_CLASSES = 5
