"""Fetch the datasets into the layout the loaders read: ``python -m domainbed_sil.download``.

    python -m domainbed_sil.download mnist --data_dir DIR        # torchvision's MNIST mirrors
    python -m domainbed_sil.download pacs  --data_dir DIR        # DomainBed's Google Drive PACS.zip
    python -m domainbed_sil.download vlcs  --data_dir DIR        # DomainBed's Google Drive VLCS.tar.gz
    python -m domainbed_sil.download pacs  --data_dir DIR --from PACS.zip   # no internet: import

Downloads go to ``DIR/downloads/<file>.part`` and resume from where they stopped (HTTP Range)
when the command is run again.  MNIST is verified by the md5 of each decompressed file, PACS and
VLCS by the protocol's image count per domain.  ``--from`` takes a zip, a tar(.gz) or a folder
that contains the dataset's domain folders somewhere inside (DomainBed's ``kfold/``, the JiGen
release's ``CALTECH/full/0/...``, ...); domain and class folders are renamed to the loaders'
names.  Exit status: 0 done, 1 download or verification failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import http.cookiejar
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from domainbed_sil.datasets.base import resolve_data_dir
from domainbed_sil.datasets.images import (IMAGE_EXTENSIONS, PACS, SPLIT_DIRS, VLCS,
                                           ImageFolderError, scan_class_folders)
from domainbed_sil.datasets.mnist import MNIST_MD5, mnist_raw_dir

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
GDRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"
CHUNK = 1 << 20
USER_AGENT = "domainbed_sil-download/0.1 (python urllib)"


class DownloadError(RuntimeError):
    """A download, an archive or a verification failed; the message says what to do."""


@dataclass(frozen=True)
class ImageSource:
    """Where an image dataset comes from and how its folders may be named there."""

    dataset: type  # an ImageDomainDataset subclass
    gdrive_id: str
    archive: str
    # other names of the domain folders in other releases -> the loader's names
    domain_aliases: Mapping[str, str]


SOURCES: Dict[str, ImageSource] = {
    "pacs": ImageSource(PACS, "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd", "PACS.zip", {}),
    "vlcs": ImageSource(VLCS, "1skwblH1_okBwxWxmRsp9_qi15hyPpxg8", "VLCS.tar.gz",
                        {"CALTECH": "Caltech101", "LABELME": "LabelMe", "SUN": "SUN09", "PASCAL": "VOC2007"}),
}


# ----------------------------------------------------------------------------- HTTP


class UrllibTransport:
    """``open(url, headers) -> response`` over urllib with a cookie jar (Google Drive sets one).

    A response has ``status``, ``headers.get(name)``, ``read(n)`` and ``close()``; HTTP errors are
    returned as responses, so that callers decide what a 404 or a 416 means.
    """

    def __init__(self, timeout: float = 60.0):
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.timeout = timeout

    def open(self, url: str, headers: Optional[Mapping[str, str]] = None):
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
        try:
            return self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            return err  # has status, headers, read()
        except (urllib.error.URLError, OSError) as err:
            raise DownloadError(f"cannot reach {url} ({err}); on a machine without internet download the file "
                                f"elsewhere and use --from PATH") from err

    def cookie_values(self) -> Dict[str, str]:
        return {cookie.name: cookie.value for cookie in self.cookies}


def _status(response) -> int:
    return getattr(response, "status", None) or response.getcode()


def _total_size(response, offset: int) -> Optional[int]:
    """Full file size from Content-Range (206) or Content-Length (200), if the server says."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return None if length is None else int(length) + offset


def download_file(url: str, dest: Path, transport, log: Callable[[str], None] = print) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part`` with HTTP Range."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    response = transport.open(url, {"Range": f"bytes={offset}-"} if offset else {})
    try:
        status = _status(response)
        if status == 416 and offset:  # nothing after offset: the part file is already complete
            part.replace(dest)
            return dest
        if status not in (200, 206):
            raise DownloadError(f"{url}: HTTP {status}")
        if status == 200 and offset:
            log(f"{url}: server ignored the resume request; starting over")
            offset = 0
        elif offset:
            log(f"resuming {dest.name} at {offset} bytes")
        total = _total_size(response, offset)
        written = offset
        with open(part, "ab" if offset else "wb") as out:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
    finally:
        response.close()
    if total is not None and written != total:
        raise DownloadError(f"{url}: download stopped at {written} of {total} bytes; "
                            f"run the same command again to resume")
    part.replace(dest)
    return dest


class _ConfirmFormParser(html.parser.HTMLParser):
    """Collects the download form (action, hidden inputs) and every href of a Drive warning page."""

    def __init__(self):
        super().__init__()
        self.action: Optional[str] = None
        self.inputs: Dict[str, str] = {}
        self.hrefs: List[str] = []
        self.title = ""
        self._in_form = self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and (attrs.get("id") == "download-form" or "download" in (attrs.get("action") or "")):
            self.action, self._in_form = attrs.get("action"), True
        elif tag == "input" and self._in_form and attrs.get("name"):
            self.inputs[attrs["name"]] = attrs.get("value") or ""
        elif tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def gdrive_confirm_url(page: str, file_id: str, cookies: Optional[Mapping[str, str]] = None) -> str:
    """The URL that actually serves a large Drive file, from its "can't scan for viruses" page.

    Handles the current page (a ``download-form`` whose hidden inputs carry ``confirm`` and
    ``uuid``), the older page (a link with ``confirm=TOKEN``) and the older cookie
    (``download_warning_*=TOKEN``).  Anything else (quota exceeded, not shared) is a DownloadError.
    """
    parser = _ConfirmFormParser()
    parser.feed(page)
    if parser.action:
        return f"{parser.action}?{urllib.parse.urlencode(parser.inputs)}"
    for href in parser.hrefs:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(href.replace("&amp;", "&")).query)
        if "confirm" in query:
            return (f"https://drive.google.com/uc?export=download&confirm={query['confirm'][0]}"
                    f"&id={urllib.parse.quote(file_id)}")
    for name, value in (cookies or {}).items():
        if name.startswith("download_warning"):
            return f"https://drive.google.com/uc?export=download&confirm={value}&id={urllib.parse.quote(file_id)}"
    title = " ".join(parser.title.split()) or "no title"
    raise DownloadError(f"Google Drive did not offer file {file_id} for download (page: {title!r}); it may be over "
                        f"its download quota: fetch it in a browser from "
                        f"https://drive.google.com/file/d/{file_id} and pass the file with --from")


def resolve_gdrive_url(file_id: str, transport) -> str:
    """The direct download URL of a public Drive file (through the confirmation page if any)."""
    url = GDRIVE_URL.format(id=urllib.parse.quote(file_id))
    response = transport.open(url, {})
    try:
        status = _status(response)
        if status != 200:
            raise DownloadError(f"Google Drive file {file_id}: HTTP {status}")
        if not (response.headers.get("Content-Type") or "").startswith("text/html"):
            return url  # small files come straight away
        page = response.read(4 * CHUNK).decode("utf-8", errors="replace")
    finally:
        response.close()
    cookies = transport.cookie_values() if hasattr(transport, "cookie_values") else {}
    return gdrive_confirm_url(page, file_id, cookies)


# ----------------------------------------------------------------------------- archives and folders


def _safe_member(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not str(target).startswith(str(root.resolve()) + "/") and target != root.resolve():
        raise DownloadError(f"archive member {name!r} would be written outside the target folder; refusing it")
    return target


def extract_archive(archive: Path, into: Path) -> None:
    """Unpack a zip or tar(.gz/.bz2/.xz) into ``into``; members escaping ``into`` are refused."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    _safe_member(into, name)
                z.extractall(into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    _safe_member(into, member.name)
                    if member.issym() or member.islnk() or member.isdev():
                        raise DownloadError(f"archive member {member.name!r} is a link or device; refusing it")
                # members were vetted above; the "data" filter (Python >= 3.11.4) is a second guard
                if hasattr(tarfile, "data_filter"):
                    t.extractall(into, filter="data")
                else:
                    t.extractall(into)
        else:
            raise DownloadError(f"{archive} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise DownloadError(f"{archive}: cannot unpack ({type(err).__name__}: {err}); "
                            f"delete it and download again") from err


def find_dataset_root(tree: Path, names: Sequence[str]) -> Path:
    """The shallowest folder under ``tree`` (itself included) holding at least two of ``names``."""
    wanted = set(names)
    level = [tree]
    while level:
        for folder in sorted(level):
            if len(wanted & {p.name for p in folder.iterdir() if p.is_dir()}) >= 2:
                return folder
        level = [p for folder in level for p in sorted(folder.iterdir()) if p.is_dir() and not p.is_symlink()]
    raise DownloadError(f"no folder with the domain folders ({', '.join(sorted(wanted))}) inside {tree}")


def normalise_layout(root: Path, source: ImageSource) -> None:
    """Rename alias domain folders and class-index folders (``0`` ..) to the loader's names, in place."""
    for alias, name in source.domain_aliases.items():
        if (root / alias).is_dir() and not (root / name).exists():
            (root / alias).rename(root / name)
    classes = source.dataset.CLASSES
    for domain in source.dataset.ENVIRONMENTS:
        domain_dir = root / domain
        if not domain_dir.is_dir():
            continue
        splits = [domain_dir / s for s in SPLIT_DIRS]
        for folder in splits if all(s.is_dir() for s in splits) else [domain_dir]:
            for entry in sorted(folder.iterdir()):
                if entry.is_dir() and entry.name.isdigit() and int(entry.name) < len(classes):
                    target = folder / classes[int(entry.name)]
                    if target.exists():
                        raise DownloadError(f"{folder} has both {entry.name}/ and {target.name}/")
                    entry.rename(target)


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
               and not p.name.startswith("."))


def verify_image_dataset(root: Path, dataset: type, check_counts: bool = True) -> Dict[str, int]:
    """Image count per domain after checking the layout; DownloadError listing every problem.

    For a domain with the official ``full/`` + ``test/`` split, ``full/`` is counted.
    """
    problems: List[str] = []
    counts: Dict[str, int] = {}
    for domain in dataset.ENVIRONMENTS:
        domain_dir = root / domain
        if not domain_dir.is_dir():
            problems.append(f"missing domain folder {domain_dir}")
            continue
        has_split = all((domain_dir / s).is_dir() for s in SPLIT_DIRS)
        try:
            for folder in [domain_dir / s for s in SPLIT_DIRS] if has_split else [domain_dir]:
                scan_class_folders(folder, dataset.CLASSES)
        except ImageFolderError as err:
            problems.append(str(err))
            continue
        counts[domain] = count_images(domain_dir / "full" if has_split else domain_dir)
        expected = dataset.EXPECTED_COUNTS.get(domain)
        if check_counts and counts[domain] != expected:
            problems.append(f"{domain} has {counts[domain]} images, the protocol expects {expected}")
    if problems:
        raise DownloadError(f"{root} failed verification: " + "; ".join(problems))
    return counts


def install_image_dataset(source_path: Path, key: str, data_dir: Path, check_counts: bool = True,
                          log: Callable[[str], None] = print) -> Path:
    """Unpack / copy ``source_path`` into ``data_dir/<NAME>``, normalise and verify it; atomic."""
    source = SOURCES[key]
    name = source.dataset.NAME
    dest = data_dir / name
    staging = data_dir / f".{name}.import.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if source_path.is_dir():
            root = find_dataset_root(source_path, [*source.dataset.ENVIRONMENTS, *source.domain_aliases])
            log(f"copying {root} -> {dest}")
            shutil.copytree(root, staging / name, symlinks=False)
            root = staging / name
        else:
            log(f"unpacking {source_path} -> {dest}")
            extract_archive(source_path, staging)
            root = find_dataset_root(staging, [*source.dataset.ENVIRONMENTS, *source.domain_aliases])
        normalise_layout(root, source)
        counts = verify_image_dataset(root, source.dataset, check_counts)
        root.replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{name}: {sum(counts.values())} images ({', '.join(f'{d} {n}' for d, n in counts.items())}) in {dest}")
    return dest


def fetch_image_dataset(key: str, data_dir: Path, from_path: Optional[Path], transport,
                        check_counts: bool = True, log: Callable[[str], None] = print) -> Path:
    source = SOURCES[key]
    dest = data_dir / source.dataset.NAME
    if dest.exists():
        try:
            verify_image_dataset(dest, source.dataset, check_counts)
        except DownloadError as err:
            raise DownloadError(f"{dest} already exists but {err}; move it away and run again") from err
        log(f"{dest} is already present and verified")
        return dest
    if from_path is None:
        archive = data_dir / "downloads" / source.archive
        if not archive.exists():
            log(f"downloading {source.archive} from Google Drive (id {source.gdrive_id})")
            download_file(resolve_gdrive_url(source.gdrive_id, transport), archive, transport, log)
        from_path = archive
    return install_image_dataset(from_path, key, data_dir, check_counts, log)


# ----------------------------------------------------------------------------- MNIST


def mnist_file_ok(path: Path, name: str) -> bool:
    """True when ``path`` (gzip or plain) decompresses to the pinned md5 of ``name``."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError):
        return False
    return hashlib.md5(data).hexdigest() == MNIST_MD5[name]


def fetch_mnist(data_dir: Path, from_path: Optional[Path], transport, log: Callable[[str], None] = print) -> Path:
    """The four MNIST files in ``data_dir/MNIST/raw/<name>.gz``, each md5-verified after decompression."""
    raw = mnist_raw_dir(data_dir)
    raw.mkdir(parents=True, exist_ok=True)
    staging = None
    if from_path is not None and not from_path.is_dir():
        staging = data_dir / ".MNIST.import.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        extract_archive(from_path, staging)
        from_path = staging
    try:
        for name in MNIST_MD5:
            target = raw / f"{name}.gz"
            if any(mnist_file_ok(p, name) for p in (target, raw / name) if p.exists()):
                log(f"{name}: present and verified")
                continue
            if from_path is not None:
                _import_mnist_file(from_path, name, target)
            else:
                _download_mnist_file(name, target, transport, log)
            log(f"{name}: verified")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return raw


def _import_mnist_file(folder: Path, name: str, target: Path) -> None:
    candidates = sorted(p for p in folder.rglob(f"{name}*") if p.name in (name, f"{name}.gz"))
    if not candidates:
        raise DownloadError(f"no {name}(.gz) inside {folder}")
    good = [p for p in candidates if mnist_file_ok(p, name)]
    if not good:
        raise DownloadError(f"{candidates[0]}: md5 of the decompressed file is not {MNIST_MD5[name]}")
    data = good[0].read_bytes()
    target.write_bytes(data if good[0].suffix == ".gz" else gzip.compress(data))


def _download_mnist_file(name: str, target: Path, transport, log: Callable[[str], None]) -> None:
    failures = []
    for mirror in MNIST_MIRRORS:
        try:
            download_file(f"{mirror}{name}.gz", target, transport, log)
        except DownloadError as err:
            failures.append(str(err))
            # .gz bytes differ between mirrors: a partial file must not be resumed from another one
            target.with_name(target.name + ".part").unlink(missing_ok=True)
            continue
        if mnist_file_ok(target, name):
            return
        failures.append(f"{mirror}{name}.gz: md5 of the decompressed file is not {MNIST_MD5[name]}")
        target.unlink()
    raise DownloadError(f"{name}: every mirror failed ({'; '.join(failures)})")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m domainbed_sil.download", description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["mnist", "pacs", "vlcs"])
    p.add_argument("--data_dir", default=None, help="default: $DOMAINBED_SIL_DATA, else ./data")
    p.add_argument("--from", dest="from_path", default=None, metavar="PATH",
                   help="import from a local archive (zip, tar, tar.gz) or folder instead of downloading")
    p.add_argument("--skip_count_check", action="store_true",
                   help="PACS/VLCS: check the layout but not the protocol's image count per domain")
    return p


def main(argv: Optional[Sequence[str]] = None, transport=None) -> int:
    """Entry point; returns 0 (done), 1 (download or verification failed) or 2 (bad arguments)."""
    args = build_parser().parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    from_path = Path(args.from_path).expanduser() if args.from_path else None
    if from_path is not None and not from_path.exists():
        print(f"error: --from {from_path} does not exist", file=sys.stderr)
        return 2
    if args.skip_count_check and args.dataset == "mnist":
        print("error: --skip_count_check applies to pacs and vlcs (MNIST is always md5-verified)", file=sys.stderr)
        return 2
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create --data_dir {data_dir}: {err}", file=sys.stderr)
        return 2
    transport = transport or UrllibTransport()
    try:
        if args.dataset == "mnist":
            fetch_mnist(data_dir, from_path, transport)
        else:
            fetch_image_dataset(args.dataset, data_dir, from_path, transport, not args.skip_count_check)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
