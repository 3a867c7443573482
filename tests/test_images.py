"""PACS / VLCS from folders, image networks and the JiGen protocol, on the real mini fixtures."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from conftest import needs_mini_fixtures

from domainbed_sil import image_networks, train
from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.algorithms.base import learning_rate
from domainbed_sil.datasets import DATASETS
from domainbed_sil.datasets.base import split_environment
from domainbed_sil.datasets.images import WORKERS_ENV, ImageFolderError, build_transforms, load_rgb
from domainbed_sil.hparams import default_hparams, seed_hash
from domainbed_sil.image_networks import PretrainedWeightsError

pytestmark = needs_mini_fixtures

PACS, VLCS = DATASETS.get("PACS"), DATASETS.get("VLCS")
SMALL = 64  # pixels: the smallest round size AlexNet's feature stack accepts
CPU = torch.device("cpu")


def fixture_hparams(dataset_class, algorithm="ERM", **overrides):
    """Protocol defaults for ``algorithm`` on the mini fixture: random weights, small images."""
    hparams = default_hparams(ALGORITHMS.get(algorithm), dataset_class)
    mini = {"data_subdir": f"{dataset_class.NAME}_mini", "pretrained": False, "image_size": SMALL, "batch_size": 4}
    if dataset_class is VLCS:
        mini["allow_missing_domains"] = True  # VLCS_mini has no VOC2007
    hparams.update({**mini, **overrides})
    return hparams


@pytest.fixture(autouse=True)
def no_loader_workers(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")


@pytest.fixture(scope="module")
def pacs_mini(data_dir):
    return PACS(data_dir, fixture_hparams(PACS), trial_seed=0, test_envs=[0])


@pytest.fixture(scope="module")
def vlcs_mini(data_dir):
    return VLCS(data_dir, fixture_hparams(VLCS), trial_seed=0, test_envs=[0])


@pytest.fixture
def pacs_copy(data_dir, tmp_path):
    """A writable copy of PACS_mini (30 small images) under ``tmp_path/PACS``."""
    shutil.copytree(data_dir / "PACS_mini", tmp_path / "PACS")
    return tmp_path


def _labels_by_folder(dataset):
    return {(env.name, Path(path).parent.name, label) for env in dataset.environments for path, label in env.samples}


# ----------------------------------------------------------------------------- labels and layout


def test_pacs_house_is_class_5_in_every_domain_that_has_it(pacs_mini):
    seen = _labels_by_folder(pacs_mini)
    assert {(d, 5) for d, c, _ in seen if c == "house"} == {(d, 5) for d in ("cartoon", "photo", "sketch")}
    assert all(label == PACS.CLASSES.index(folder) for _, folder, label in seen)
    # art_painting lacks house, photo lacks giraffe: the classes after the gap keep their index
    assert ("art_painting", "person", 6) in seen and ("photo", "guitar", 3) in seen


def test_vlcs_labels_come_from_the_fixed_class_list(vlcs_mini):
    seen = _labels_by_folder(vlcs_mini)
    assert all(label == VLCS.CLASSES.index(folder) for _, folder, label in seen)
    assert {d for d, c, label in seen if c == "person"} == {"Caltech101", "SUN09"}  # LabelMe has none
    assert vlcs_mini.num_classes == 5


def test_sketch_pngs_load_as_rgb_at_the_requested_size(pacs_mini):
    sketch = pacs_mini.environments[3]
    png = [i for i, (path, _) in enumerate(sketch.samples) if path.endswith(".png")]
    assert png
    x, y = sketch[png[0]]
    assert x.shape == (3, SMALL, SMALL) and torch.isfinite(x).all() and y == sketch.targets[png[0]]


def test_vlcs_mini_needs_allow_missing_domains_and_names_the_missing_folder(data_dir):
    with pytest.raises(ImageFolderError, match="missing domain folder.*VOC2007"):
        VLCS(data_dir, fixture_hparams(VLCS, allow_missing_domains=False), trial_seed=0, test_envs=[0])


def test_a_missing_domain_cannot_be_the_test_domain(data_dir):
    with pytest.raises(ImageFolderError, match="test env 3 .VOC2007. has no folder"):
        VLCS(data_dir, fixture_hparams(VLCS), trial_seed=0, test_envs=[3])


def test_allow_missing_domains_still_refuses_a_gap_before_present_domains(pacs_copy):
    shutil.rmtree(pacs_copy / "PACS" / "cartoon")
    with pytest.raises(ImageFolderError, match="missing domain folder.*cartoon.*only allows the last"):
        PACS(pacs_copy, fixture_hparams(PACS, data_subdir="", allow_missing_domains=True), 0, [0])


def test_missing_dataset_folder_says_how_to_download(tmp_path):
    with pytest.raises(ImageFolderError, match="domainbed_sil.download pacs"):
        PACS(tmp_path, fixture_hparams(PACS, data_subdir=""), 0, [0])


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "photo" / "notes.txt").write_text("x"), "stray file .*notes.txt"),
    (lambda root: (root / "photo" / "dog" / "list.txt").write_text("x"), "stray entry .*list.txt"),
    (lambda root: (root / "photo" / "cat").mkdir(), "unknown class folder .*cat"),
    (lambda root: (root / "photo" / "giraffe").mkdir(), "empty class folder .*giraffe"),
])
def test_layout_problems_are_one_clear_error(pacs_copy, damage, message):
    damage(pacs_copy / "PACS")
    with pytest.raises(ImageFolderError, match=message):
        PACS(pacs_copy, fixture_hparams(PACS, data_subdir=""), 0, [0])


def test_hidden_files_are_not_data(pacs_copy):
    (pacs_copy / "PACS" / "photo" / ".DS_Store").write_bytes(b"\0")
    (pacs_copy / "PACS" / "photo" / "dog" / ".DS_Store").write_bytes(b"\0")
    dataset = PACS(pacs_copy, fixture_hparams(PACS, data_subdir=""), 0, [0])
    assert [len(env) for env in dataset.environments] == [10, 10, 10, 10]


def test_image_with_unreadable_header_is_skipped_counted_and_warned(pacs_copy):
    bad = pacs_copy / "PACS" / "photo" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*broken.jpg"):
        dataset = PACS(pacs_copy, fixture_hparams(PACS, data_subdir=""), 0, [0])
    assert len(dataset.environments[2]) == 10 and dataset.unreadable == [f"{bad} (UnidentifiedImageError: "
                                                                        f"cannot identify image file '{bad}')"]


def test_image_that_fails_to_decode_is_replaced_in_its_batch_and_warned(pacs_copy):
    folder = pacs_copy / "PACS" / "photo" / "dog"
    good = sorted(folder.iterdir())[0]
    truncated = folder / "truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut off
    dataset = PACS(pacs_copy, fixture_hparams(PACS, data_subdir=""), 0, [0])
    photo = dataset.environments[2]
    assert str(truncated) in [p for p, _ in photo.samples]  # the header scan accepts it
    batches = dataset.minibatches([photo], 11, CPU, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="failed to decode.*truncated.jpg"):
        [(x, y)] = next(batches)
    assert x.shape == (11, 3, SMALL, SMALL) and len(y) == 11 and torch.isfinite(x).all()
    assert list(dataset.skipped) == [str(truncated)]


def test_official_vlcs_split_uses_test_folder_for_the_test_domain(data_dir, tmp_path):
    """JiGen's layout: <domain>/{full,test}/<class index>/; the target domain is its test/ split."""
    for domain in ("Caltech101", "LabelMe", "SUN09"):
        source = data_dir / "VLCS_mini" / domain
        for cls in sorted(p.name for p in source.iterdir()):
            index = str(VLCS.CLASSES.index(cls))
            images = sorted((source / cls).iterdir())
            shutil.copytree(source / cls, tmp_path / "VLCS" / domain / "full" / index)
            (tmp_path / "VLCS" / domain / "test" / index).mkdir(parents=True)
            shutil.copy(images[0], tmp_path / "VLCS" / domain / "test" / index / images[0].name)
    hparams = fixture_hparams(VLCS, data_subdir="")
    dataset = VLCS(tmp_path, hparams, trial_seed=0, test_envs=[1])
    caltech, labelme, _ = dataset.environments
    assert all("/full/" in p for p, _ in caltech.samples) and len(caltech) == 55
    assert all("/test/" in p for p, _ in labelme.samples) and len(labelme) == 4
    assert labelme.targets.tolist() == [0, 1, 2, 3]  # bird, car, chair, dog from folders 0..3


# ----------------------------------------------------------------------------- splits and batches


def _split(dataset, i, trial_seed):
    inner, outer = split_environment(dataset.environments[i], dataset.HOLDOUT_FRACTION, seed_hash(trial_seed, i))
    return set(inner.indices), set(outer.indices)


def test_validation_split_is_10_percent_disjoint_and_fixed_by_the_trial_seed(data_dir, vlcs_mini):
    other_algorithm = VLCS(data_dir, fixture_hparams(VLCS, "SIL"), trial_seed=0, test_envs=[0])
    for i, env in enumerate(vlcs_mini.environments):
        inner, outer = _split(vlcs_mini, i, trial_seed=0)
        assert len(outer) == round(0.1 * len(env)) and not inner & outer and inner | outer == set(range(len(env)))
        assert _split(other_algorithm, i, trial_seed=0) == (inner, outer)
    assert any(_split(vlcs_mini, i, 1)[1] != _split(vlcs_mini, i, 0)[1] for i in range(3))


def test_minibatches_have_equal_sizes_right_labels_and_repeat_for_the_same_generator(pacs_mini):
    splits = pacs_mini.environments[1:]
    first = pacs_mini.minibatches(splits, 12, CPU, torch.Generator().manual_seed(3))
    again = pacs_mini.minibatches(splits, 12, CPU, torch.Generator().manual_seed(3))
    for _ in range(2):  # 12 > 10 images per domain: batches wrap across epochs
        batch, repeat = next(first), next(again)
        assert [tuple(x.shape) for x, _ in batch] == [(12, 3, SMALL, SMALL)] * 3
        for (x, y), (x2, y2), env in zip(batch, repeat, splits):
            assert torch.equal(y, y2) and set(y.tolist()) <= set(env.targets.tolist())


def test_eval_batches_cover_the_split_once_with_the_resize_transform(pacs_mini):
    env = pacs_mini.environments[2]
    chunks = list(pacs_mini.eval_batches(env, CPU, batch_size=4))
    assert [len(y) for _, y in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in chunks]), env.targets)
    x0, _ = env[0]
    assert torch.allclose(chunks[0][0][0], x0)  # deterministic: same pixels as direct indexing


@pytest.mark.parametrize("kind", ["jigen", "domainbed"])
def test_transforms_make_normalised_square_images(pacs_mini, kind):
    train_tf, eval_tf = build_transforms(kind, 40)
    image = pacs_mini.environments[0].samples[0][0]
    for tf in (train_tf, eval_tf):
        x = tf(load_rgb(image))
        assert x.shape == (3, 40, 40) and x.min() < 0 < x.max()


def test_bad_transform_and_batch_size_are_rejected(data_dir):
    with pytest.raises(ValueError, match="'transform' must be one of jigen, domainbed"):
        PACS(data_dir, fixture_hparams(PACS, transform="caffe"), 0, [0])
    with pytest.raises(ValueError, match="'batch_size' must be a positive integer"):
        PACS(data_dir, fixture_hparams(PACS, batch_size=0), 0, [0])


# ----------------------------------------------------------------------------- protocol: steps and lr


def test_30_epochs_of_the_smallest_source_domain_and_lr_decay_at_epoch_24(data_dir):
    hparams = fixture_hparams(PACS)  # batch 4; each source domain has 10 images, 9 after the 10% holdout
    assert hparams["lr_decay_at_step"] == -1
    dataset = PACS(data_dir, hparams, trial_seed=0, test_envs=[0])
    per_epoch = math.ceil(9 / 4)
    assert dataset.default_checkpoint_freq() == per_epoch and dataset.default_steps() == 30 * per_epoch
    assert dataset.resolve_hparams(hparams)["lr_decay_at_step"] == 24 * per_epoch  # what train.py records
    assert hparams["lr_decay_at_step"] == -1  # the caller's dict is not mutated


def test_epoch_length_follows_the_runs_holdout_fraction_not_the_class_default(data_dir):
    hparams = fixture_hparams(PACS)  # batch 4; 10 images per source domain, 5 kept with holdout 0.5
    dataset = PACS(data_dir, hparams, trial_seed=0, test_envs=[0], holdout_fraction=0.5)
    per_epoch = math.ceil(5 / 4)
    assert dataset.default_checkpoint_freq() == per_epoch and dataset.default_steps() == 30 * per_epoch
    assert dataset.resolve_hparams(hparams)["lr_decay_at_step"] == 24 * per_epoch


def test_train_cli_derives_epochs_from_its_holdout_fraction(data_dir, tmp_path):
    hparams = json.dumps({"data_subdir": "PACS_mini", "pretrained": False, "image_size": SMALL, "batch_size": 4})
    setup = train.prepare(train.build_parser().parse_args([
        "--data_dir", str(data_dir), "--dataset", "PACS", "--hparams", hparams, "--holdout_fraction", "0.5",
        "--output_dir", str(tmp_path / "run")]))
    assert setup.args["steps"] == 30 * 2 and setup.hparams["lr_decay_at_step"] == 24 * 2


def test_learning_rate_drops_tenfold_at_the_decay_step():
    hparams = {"lr": 5e-4, "lr_decay_at_step": 72, "lr_decay_factor": 0.1}
    assert [learning_rate(hparams, s) for s in (0, 71, 72, 89)] == [5e-4, 5e-4, 5e-4 * 0.1, 5e-4 * 0.1]
    assert learning_rate({"lr": 1e-3}, 10_000) == 1e-3
    with pytest.raises(ValueError, match="must be resolved"):
        learning_rate({"lr": 1e-3, "lr_decay_at_step": -1}, 0)


# ----------------------------------------------------------------------------- networks and algorithms


@pytest.mark.parametrize("name", ["ERM", "IRM", "VREx", "SIL"])
def test_an_update_on_pacs_mini_with_random_alexnet_is_finite(pacs_mini, name):
    hparams = fixture_hparams(PACS, name, warmup_steps=0, lr_decay_at_step=0)
    torch.manual_seed(0)
    algorithm = ALGORITHMS.get(name)(pacs_mini.input_shape, pacs_mini.num_classes, 3, hparams)
    batches = pacs_mini.minibatches(pacs_mini.environments[1:], 4, CPU, torch.Generator().manual_seed(0))
    before = algorithm.network.classifier.weight.detach().clone()
    out = algorithm.update(next(batches))
    assert all(math.isfinite(v) for v in out.values()), out
    if name != "ERM":
        # IRM (two-halves estimate, may be negative), V-REx and SIL (double backprop through AlexNet)
        assert out["penalty"] != 0
    assert not torch.equal(before, algorithm.network.classifier.weight)
    assert algorithm.predict(next(batches)[0][0]).shape == (4, 7)


def test_sil_double_backprop_runs_through_resnet18_batchnorm(data_dir):
    hparams = fixture_hparams(PACS, "SIL", network="resnet18", image_size=32, lr_decay_at_step=0)
    dataset = PACS(data_dir, hparams, trial_seed=0, test_envs=[0])
    torch.manual_seed(0)
    algorithm = ALGORITHMS.get("SIL")(dataset.input_shape, dataset.num_classes, 3, hparams)
    out = algorithm.update(next(dataset.minibatches(dataset.environments[1:], 4, CPU, torch.Generator())))
    assert math.isfinite(out["loss"]) and out["penalty"] > 0


def test_sgd_follows_the_lr_schedule_inside_update(pacs_mini):
    hparams = fixture_hparams(PACS, "ERM", lr_decay_at_step=1)
    algorithm = ALGORITHMS.get("ERM")(pacs_mini.input_shape, pacs_mini.num_classes, 3, hparams)
    batches = pacs_mini.minibatches(pacs_mini.environments[1:], 2, CPU, torch.Generator().manual_seed(0))
    rates = []
    for _ in range(2):
        algorithm.update(next(batches))
        rates.append(algorithm.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([5e-4, 5e-5])
    group = algorithm.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)


@pytest.mark.parametrize("network, features", [("alexnet", 4096), ("resnet18", 512)])
def test_featurizer_drops_the_imagenet_layer_and_adds_a_linear_head(network, features):
    model = image_networks.build_image_network(network, (3, SMALL, SMALL), 7, {"pretrained": False})
    assert model.classifier.in_features == features and model.classifier.out_features == 7
    assert model(torch.zeros(2, 3, SMALL, SMALL)).shape == (2, 7)


def test_alexnet_rejects_images_too_small_for_its_pooling():
    with pytest.raises(ValueError, match="at least 63 pixels.*image_size"):
        image_networks.build_image_network("alexnet", (3, 40, 40), 7, {"pretrained": False})


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path, and downloads that fail as they do offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_pretrained_weights_name_the_file_to_place_and_the_opt_out(offline_hub):
    with pytest.raises(PretrainedWeightsError) as err:
        image_networks.build_image_network("alexnet", (3, SMALL, SMALL), 7, {"pretrained": True})
    message = str(err.value)
    assert str(offline_hub / "alexnet-owt-7be5be79.pth") in message and "TORCH_HOME" in message
    assert '"pretrained": false' in message


def test_train_cli_reports_missing_weights_in_one_line_before_writing(data_dir, offline_hub, tmp_path, capsys):
    hparams = json.dumps({"data_subdir": "PACS_mini", "image_size": SMALL})
    code = train.main(["--data_dir", str(data_dir), "--dataset", "PACS", "--hparams", hparams,
                       "--output_dir", str(tmp_path / "run")])
    assert code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.count("\n") == 1


def test_pre_placed_weights_are_loaded(offline_hub):
    offline_hub.mkdir(parents=True)
    reference = image_networks.ARCHITECTURES["resnet18"].constructor(weights=None)
    torch.save(reference.state_dict(), offline_hub / "resnet18-f37072fd.pth")
    model = image_networks.build_image_network("resnet18", (3, SMALL, SMALL), 7, {"pretrained": True})
    assert torch.equal(model.featurizer.conv1.weight, reference.conv1.weight)


def test_pre_placed_weights_are_read_once_by_dataset_and_network(offline_hub, data_dir, monkeypatch):
    offline_hub.mkdir(parents=True)
    torch.save(image_networks.ARCHITECTURES["resnet18"].constructor(weights=None).state_dict(),
               offline_hub / "resnet18-f37072fd.pth")
    reads = []
    real_load = image_networks.load_imagenet_state
    monkeypatch.setattr(image_networks, "load_imagenet_state", lambda name: reads.append(name) or real_load(name))
    hparams = fixture_hparams(PACS, network="resnet18", pretrained=True)
    dataset = PACS(data_dir, hparams, trial_seed=0, test_envs=[0])
    image_networks.build_image_network("resnet18", dataset.input_shape, dataset.num_classes, hparams)
    assert reads == ["resnet18"]


# ----------------------------------------------------------------------------- end to end


def test_train_cli_runs_on_pacs_mini_with_a_loader_worker(data_dir, tmp_path):
    hparams = json.dumps({"data_subdir": "PACS_mini", "pretrained": False, "image_size": SMALL, "batch_size": 4})
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_sil.train", "--data_dir", str(data_dir), "--dataset", "PACS",
         "--algorithm", "ERM", "--hparams", hparams, "--steps", "2", "--checkpoint_freq", "2",
         "--output_dir", str(tmp_path / "run"), "--skip_model_save"],
        capture_output=True, text=True, timeout=300, env={**os.environ, WORKERS_ENV: "1"})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]  # step 0 and the last step
    last = records[-1]
    assert last["hparams"]["lr_decay_at_step"] == 24 * 3 and last["hparams"]["network"] == "alexnet"
    assert last["epoch"] == pytest.approx(2 * 4 / 9)
    assert {f"env{i}_{s}acc" for i in range(4) for s in ("", "in_", "out_")} <= set(last)
    assert math.isfinite(last["loss"]) and (tmp_path / "run" / "done").exists()


def test_train_runs_erm_on_vlcs_mini_trained_on_its_three_domains(data_dir, tmp_path):
    hparams = json.dumps({"data_subdir": "VLCS_mini", "allow_missing_domains": True, "pretrained": False,
                          "image_size": SMALL, "batch_size": 4})
    code = train.main(["--data_dir", str(data_dir), "--dataset", "VLCS", "--test_envs", "2", "--hparams", hparams,
                       "--steps", "1", "--output_dir", str(tmp_path / "run"), "--skip_model_save"])
    assert code == 0
    [record] = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {k for k in record if k.endswith("_acc") and "_" not in k[:-4]} == {"env0_acc", "env1_acc", "env2_acc"}
