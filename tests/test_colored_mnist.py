"""Colored MNIST built from the real MNIST files: sizes, colour and label statistics, determinism."""
import gzip
import shutil

import pytest
import torch

from domainbed_sil.datasets.mnist import ColoredMNIST, ColoredMNISTNoFlip, DataFileError, load_mnist, parse_idx


def colour_of(x: torch.Tensor) -> torch.Tensor:
    """(N,) channel index that carries the digit."""
    return (x[:, 1].flatten(1).sum(1) > 0).long()


def test_real_mnist_reads_60000_training_images_with_their_labels(data_dir):
    images, labels = load_mnist(data_dir, "train")
    assert images.shape == (60_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60_000,) and set(labels.tolist()) == set(range(10))


def test_environment_sizes_are_25000_25000_10000(cmnist):
    assert [len(env) for env in cmnist.environments] == [25_000, 25_000, 10_000]
    assert cmnist.environments[0].x.shape[1:] == (2, 14, 14)


def test_colour_agrees_with_label_80_90_and_10_percent(cmnist):
    agreement = [(colour_of(env.x) == env.y.long()).float().mean().item() for env in cmnist.environments]
    for measured, expected in zip(agreement, (0.8, 0.9, 0.1)):
        assert measured == pytest.approx(expected, abs=0.01)


def test_only_one_channel_is_lit_and_pixels_are_in_unit_range(cmnist):
    x = cmnist.environments[0].x
    lit = (x.flatten(2).sum(2) > 0).sum(1)
    assert (lit == 1).all()
    assert x.min() >= 0 and x.max() <= 1


def test_label_noise_is_25_percent_with_flip_and_0_without(data_dir, cmnist):
    _, digits = load_mnist(data_dir, "train")
    clean_test = (digits[50_000:] < 5).float()
    noisy = (cmnist.environments[2].y != clean_test).float().mean().item()
    assert noisy == pytest.approx(0.25, abs=0.01)
    no_flip = ColoredMNISTNoFlip(data_dir, {}, trial_seed=0)
    assert (no_flip.environments[2].y == clean_test).all()


def test_same_trial_seed_gives_identical_environments_for_any_algorithm(data_dir, cmnist):
    # the environments take no algorithm input at all; rebuilding with other hparams must not matter
    again = ColoredMNIST(data_dir, {"hidden_dim": 7, "lr": 0.5}, trial_seed=0)
    for a, b in zip(cmnist.environments, again.environments):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_other_trial_seed_gives_other_environments(data_dir, cmnist):
    other = ColoredMNIST(data_dir, {}, trial_seed=1)
    assert not torch.equal(cmnist.environments[0].y, other.environments[0].y)
    # the test environment is always MNIST-train images 50,000..59,999
    assert torch.equal(cmnist.environments[2].x.sum(1), other.environments[2].x.sum(1))


def test_plain_idx_files_are_read_like_gzipped_ones(tmp_path, data_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(data_dir / "MNIST" / "raw" / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    images, labels = load_mnist(tmp_path, "train")
    ref_images, ref_labels = load_mnist(data_dir, "train")
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_checksum_mismatch_names_the_file_and_the_expected_md5(tmp_path, data_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", raw)
    labels = bytearray(gzip.decompress((data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] ^= 1
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DataFileError, match=r"train-labels-idx1-ubyte\.gz.*expected a25bea736e30d166cdddb491f175f624"):
        load_mnist(tmp_path, "train")


def test_idx_parser_rejects_bad_magic_and_short_payload():
    with pytest.raises(DataFileError, match="magic"):
        parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(DataFileError, match="payload"):
        parse_idx(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 3)


def test_train_env_size_keeps_a_prefix_of_each_protocol_environment(data_dir, cmnist):
    small = ColoredMNIST(data_dir, {"train_env_size": 1000}, trial_seed=0)
    assert [len(env) for env in small.environments] == [1000, 1000, 10_000]
    assert torch.equal(small.environments[0].x, cmnist.environments[0].x[:1000])
    with pytest.raises(ValueError, match="train_env_size.*1..25000"):
        ColoredMNIST(data_dir, {"train_env_size": 30_000}, trial_seed=0)
