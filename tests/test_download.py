"""download.py offline: imports from archives and folders built here, and HTTP through a fake transport."""
from __future__ import annotations

import gzip
import io
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import needs_mini_fixtures

from domainbed_sil import download
from domainbed_sil.datasets.images import PACS, VLCS
from domainbed_sil.datasets.mnist import MNIST_MD5
from domainbed_sil.download import DownloadError, gdrive_confirm_url

FILE_ID = "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"

# What Drive answers today for a file too large to scan (trimmed; the structure is what matters)
WARNING_PAGE = f"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><p class="uc-warning-subcaption">Google Drive can't scan this file for viruses.</p>
<p>PACS.zip (166M) is too large for Google to scan for viruses. Would you still like to download this file?</p>
<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">
<input type="submit" id="uc-download-link" class="goog-inline-block jfk-button" value="Download anyway"/>
<input type="hidden" name="id" value="{FILE_ID}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="0b8e-11ef-aaaa">
</form></div></body></html>"""
LEGACY_PAGE = (f'<html><body><a id="uc-download-link" href="/uc?export=download&amp;confirm=Xy7Q&amp;id={FILE_ID}">'
               "Download anyway</a></body></html>")
QUOTA_PAGE = "<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"


class FakeResponse:
    def __init__(self, status: int, body: bytes, headers=None):
        self.status, self.headers, self._body = status, dict(headers or {}), io.BytesIO(body)

    def read(self, n: int = -1) -> bytes:
        return self._body.read(n)

    def close(self) -> None:
        pass


class FakeDrive:
    """Serves one file behind Drive's warning page; honours Range; can cut the first transfer short."""

    def __init__(self, payload: bytes, page: str = WARNING_PAGE, cut_first_at=None, honour_range=True):
        self.payload, self.page, self.cut, self.honour_range = payload, page, cut_first_at, honour_range
        self.requests = []

    def open(self, url, headers=None):
        headers = dict(headers or {})
        self.requests.append((url, headers))
        if url.startswith("https://drive.google.com/uc"):
            return FakeResponse(200, self.page.encode(), {"Content-Type": "text/html; charset=utf-8"})
        if not url.startswith("https://drive.usercontent.google.com/download?"):
            return FakeResponse(404, b"", {})
        start = int(headers["Range"][6:-1]) if "Range" in headers and self.honour_range else 0
        body = self.payload[start:]
        head = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
        if start:
            head["Content-Range"] = f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}"
        if self.cut is not None:  # the connection drops: fewer bytes than announced
            body, self.cut = body[: self.cut], None
        return FakeResponse(206 if start else 200, body, head)


class FakeMirrors:
    """MNIST mirrors: ``files[url] = bytes`` or missing (404)."""

    def __init__(self, files):
        self.files, self.requests = files, []

    def open(self, url, headers=None):
        self.requests.append(url)
        if url not in self.files:
            return FakeResponse(404, b"not found")
        return FakeResponse(200, self.files[url], {"Content-Length": str(len(self.files[url]))})


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(download.UrllibTransport, "open", refuse)


def zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"{prefix}/{path.relative_to(folder)}")
    return archive


def mini_counts(monkeypatch, dataset, folder: Path):
    counts = {d: len(list((folder / d).rglob("*.*"))) for d in dataset.ENVIRONMENTS}
    monkeypatch.setattr(dataset, "EXPECTED_COUNTS", counts)
    return counts


def labels_of(dataset_class, data_dir, **hparams):
    h = {"pretrained": False, "image_size": 64, "batch_size": 4, "transform": "jigen", "network": "alexnet",
         "data_subdir": "", "allow_missing_domains": False, "lr_decay_at_step": 0, **hparams}
    dataset = dataset_class(data_dir, h, trial_seed=0, test_envs=[0])
    return {(env.name, Path(p).parent.name, label) for env in dataset.environments for p, label in env.samples}


# ----------------------------------------------------------------------------- PACS / VLCS imports


@needs_mini_fixtures
def test_pacs_zip_with_kfold_folder_imports_verifies_and_loads(data_dir, tmp_path, monkeypatch, no_network):
    archive = zip_folder(data_dir / "PACS_mini", tmp_path / "PACS.zip", "kfold")  # DomainBed's zip layout
    counts = mini_counts(monkeypatch, PACS, data_dir / "PACS_mini")
    out = tmp_path / "data"
    assert download.main(["pacs", "--data_dir", str(out), "--from", str(archive)]) == 0
    assert {d: len(list((out / "PACS" / d).rglob("*.*"))) for d in counts} == counts
    assert labels_of(PACS, out) == labels_of(PACS, data_dir, data_subdir="PACS_mini")
    assert not list(out.glob(".*import*"))  # no staging left behind
    assert download.main(["pacs", "--data_dir", str(out), "--from", str(archive)]) == 0  # already there: no-op


@needs_mini_fixtures
def test_import_with_wrong_counts_fails_and_leaves_nothing(data_dir, tmp_path, capsys, no_network):
    archive = zip_folder(data_dir / "PACS_mini", tmp_path / "PACS.zip", "kfold")
    out = tmp_path / "data"
    assert download.main(["pacs", "--data_dir", str(out), "--from", str(archive)]) == 1
    err = capsys.readouterr().err
    assert "art_painting has 10 images, the protocol expects 2048" in err and "sketch has 10" in err
    assert sorted(p.name for p in out.iterdir()) == []


@needs_mini_fixtures
def test_skip_count_check_still_checks_the_layout(data_dir, tmp_path, capsys, no_network):
    tree = tmp_path / "tree"
    shutil.copytree(data_dir / "PACS_mini", tree / "PACS")
    (tree / "PACS" / "photo" / "dog" / "README.txt").write_text("x")
    out = tmp_path / "data"
    assert download.main(["pacs", "--data_dir", str(out), "--from", str(tree), "--skip_count_check"]) == 1
    assert "stray entry" in capsys.readouterr().err
    (tree / "PACS" / "photo" / "dog" / "README.txt").unlink()
    assert download.main(["pacs", "--data_dir", str(out), "--from", str(tree), "--skip_count_check"]) == 0
    assert (out / "PACS" / "sketch" / "house").is_dir()


@needs_mini_fixtures
def test_jigen_vlcs_tarball_is_renamed_to_domainbed_names(data_dir, tmp_path, monkeypatch, no_network):
    """CALTECH/LABELME/SUN/PASCAL with full/ + test/ and class folders 0..4 (PASCAL: a copy of SUN here)."""
    aliases = {"Caltech101": "CALTECH", "LabelMe": "LABELME", "SUN09": "SUN", "VOC2007": "PASCAL"}
    archive = tmp_path / "VLCS.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for domain, alias in aliases.items():
            source = data_dir / "VLCS_mini" / ("SUN09" if domain == "VOC2007" else domain)
            for cls_dir in sorted(source.iterdir()):
                index = VLCS.CLASSES.index(cls_dir.name)
                for n, image in enumerate(sorted(cls_dir.iterdir())):
                    tar.add(image, f"VLCS/{alias}/full/{index}/{image.name}")
                    if n == 0:
                        tar.add(image, f"VLCS/{alias}/test/{index}/{image.name}")
    counts = {"Caltech101": 55, "LabelMe": 77, "SUN09": 55, "VOC2007": 55}
    monkeypatch.setattr(VLCS, "EXPECTED_COUNTS", counts)
    out = tmp_path / "data"
    assert download.main(["vlcs", "--data_dir", str(out), "--from", str(archive)]) == 0
    assert sorted(p.name for p in (out / "VLCS").iterdir()) == sorted(aliases)
    assert sorted(p.name for p in (out / "VLCS" / "LabelMe" / "full").iterdir()) == ["bird", "car", "chair", "dog"]
    labels = labels_of(VLCS, out)
    assert all(label == VLCS.CLASSES.index(folder) for _, folder, label in labels)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "neither a zip nor a tar|cannot unpack"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("readme.txt", "hello"), "no folder with the domain folders"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("../evil/art_painting/dog/x.jpg", "x"), "outside the target"),
])
def test_bad_archives_are_one_line_errors(tmp_path, capsys, make, message, no_network):
    archive = tmp_path / "PACS.zip"
    make(archive)
    assert download.main(["pacs", "--data_dir", str(tmp_path / "data"), "--from", str(archive)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)


def test_missing_from_path_is_a_usage_error(tmp_path, capsys):
    assert download.main(["vlcs", "--data_dir", str(tmp_path), "--from", str(tmp_path / "nope.zip")]) == 2
    assert "does not exist" in capsys.readouterr().err


@needs_mini_fixtures
def test_existing_unverified_destination_is_not_overwritten(data_dir, tmp_path, capsys, no_network):
    shutil.copytree(data_dir / "PACS_mini", tmp_path / "PACS")
    assert download.main(["pacs", "--data_dir", str(tmp_path), "--from", str(tmp_path / "PACS")]) == 1
    assert "already exists but" in capsys.readouterr().err and (tmp_path / "PACS" / "photo").is_dir()


# ----------------------------------------------------------------------------- MNIST


def test_mnist_imports_from_a_folder_and_verifies_the_decompressed_md5(data_dir, tmp_path, no_network):
    out = tmp_path / "data"
    assert download.main(["mnist", "--data_dir", str(out), "--from", str(data_dir / "MNIST" / "raw")]) == 0
    assert sorted(p.name for p in (out / "MNIST" / "raw").iterdir()) == sorted(f"{n}.gz" for n in MNIST_MD5)


def test_mnist_with_a_corrupt_file_is_refused(data_dir, tmp_path, capsys, no_network):
    folder = tmp_path / "mnist"
    shutil.copytree(data_dir / "MNIST" / "raw", folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[100] ^= 1
    labels.write_bytes(gzip.compress(bytes(data)))
    assert download.main(["mnist", "--data_dir", str(tmp_path / "data"), "--from", str(folder)]) == 1
    assert "t10k-labels-idx1-ubyte.gz: md5 of the decompressed file is not 27ae3e4e" in capsys.readouterr().err


def test_mnist_download_falls_back_to_the_next_mirror(data_dir, tmp_path):
    raw = data_dir / "MNIST" / "raw"
    first, second = download.MNIST_MIRRORS
    files = {f"{second}{n}.gz": (raw / f"{n}.gz").read_bytes() for n in MNIST_MD5}
    files[f"{first}train-labels-idx1-ubyte.gz"] = gzip.compress(b"wrong bytes")  # first mirror: corrupt
    mirrors = FakeMirrors(files)
    assert download.main(["mnist", "--data_dir", str(tmp_path)], transport=mirrors) == 0
    assert all(download.mnist_file_ok(tmp_path / "MNIST" / "raw" / f"{n}.gz", n) for n in MNIST_MD5)
    assert f"{first}train-labels-idx1-ubyte.gz" in mirrors.requests


# ----------------------------------------------------------------------------- Google Drive


def test_confirm_url_from_the_current_warning_form():
    url = gdrive_confirm_url(WARNING_PAGE, FILE_ID)
    assert url == (f"https://drive.usercontent.google.com/download?id={FILE_ID}&export=download"
                   f"&confirm=t&uuid=0b8e-11ef-aaaa")


def test_confirm_url_from_the_legacy_link_and_cookie():
    assert "confirm=Xy7Q&id=" + FILE_ID in gdrive_confirm_url(LEGACY_PAGE, FILE_ID)
    url = gdrive_confirm_url("<html></html>", FILE_ID, {"download_warning_12_abc": "Tok3n"})
    assert url.endswith(f"confirm=Tok3n&id={FILE_ID}")


def test_quota_page_is_an_error_that_suggests_a_browser_and_from():
    with pytest.raises(DownloadError, match="Quota exceeded.*--from"):
        gdrive_confirm_url(QUOTA_PAGE, FILE_ID)


@needs_mini_fixtures
def test_drive_download_confirms_then_resumes_after_a_dropped_connection(data_dir, tmp_path, monkeypatch):
    payload = zip_folder(data_dir / "PACS_mini", tmp_path / "src.zip", "kfold").read_bytes()
    drive = FakeDrive(payload, cut_first_at=len(payload) // 3)
    mini_counts(monkeypatch, PACS, data_dir / "PACS_mini")
    out = tmp_path / "data"
    assert download.main(["pacs", "--data_dir", str(out)], transport=drive) == 1  # dropped mid-way
    part = out / "downloads" / "PACS.zip.part"
    assert part.stat().st_size == len(payload) // 3
    assert download.main(["pacs", "--data_dir", str(out)], transport=drive) == 0
    resumed = [h for url, h in drive.requests if "usercontent" in url][-1]
    assert resumed == {"Range": f"bytes={len(payload) // 3}-"}
    assert (out / "downloads" / "PACS.zip").read_bytes() == payload
    assert (out / "PACS" / "sketch" / "house").is_dir()


def test_a_server_that_ignores_range_restarts_the_file(tmp_path):
    payload = bytes(range(256)) * 100
    drive = FakeDrive(payload, honour_range=False)
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(payload[:1000])
    url = download.resolve_gdrive_url(FILE_ID, drive)
    download.download_file(url, dest, drive, log=lambda _: None)
    assert dest.read_bytes() == payload
