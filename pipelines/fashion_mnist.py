"""Fashion-MNIST, the demo's dataset: where its IDX files are (or a download), its class names, its splits.

The stage packages know only the generic format: `tokenizer.data` reads any folder of IDX files (MNIST layout); this
module finds that folder and names the classes.

    folder = find_fashion_mnist(None)                       # --data-dir, Debian package, cache, else download
    images, labels, names = load_fashion_mnist("test", folder)
"""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np

from tokenizer.data import load_idx_split

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
           "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/")


def cache_dir() -> Path:
    return Path(os.environ.get("MGVQ_DATA_DIR") or Path.home() / ".cache" / "mgvq") / "fashion-mnist"


def _complete(d: Path) -> bool:
    return all((d / (s + ".gz")).is_file() or (d / s).is_file() for s in FILES)


def _download(dst: Path) -> list[str]:
    """Fetch the 4 files into `dst`; returns the errors of the mirrors that failed ([] on success)."""
    dst.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MIRRORS:
        try:
            for s in FILES:
                if not (dst / (s + ".gz")).exists():
                    with urllib.request.urlopen(mirror + s + ".gz", timeout=30) as r:
                        blob = r.read()
                    (dst / (s + ".gz.tmp")).write_bytes(blob)
                    os.replace(dst / (s + ".gz.tmp"), dst / (s + ".gz"))
            return []
        except Exception as e:  # noqa: BLE001 - try the next mirror, report all
            errors.append(f"{mirror}: {type(e).__name__}: {e}")
    return errors


def find_fashion_mnist(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Folder holding the 4 IDX files: `path`, the Debian package's folder, the cache, else downloaded there."""
    if path:  # an explicit folder must hold the files
        if _complete(Path(path)):
            return Path(path)
        raise FileNotFoundError(f"Fashion-MNIST IDX files {list(FILES)} (.gz or not) not found in {path}")
    tried = []
    for d in (Path(DEBIAN_DIR), cache_dir()):
        tried.append(str(d))
        if _complete(d):
            return d
    if download:
        errors = _download(cache_dir())
        if not errors:
            return cache_dir()
        tried += errors
    raise FileNotFoundError(
        "Fashion-MNIST not found. Tried: " + "; ".join(tried) + ". Install the Debian package "
        "(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist), pass the folder "
        "holding train-images-idx3-ubyte.gz etc., or run once with internet access.")


def load_fashion_mnist(split: str = "train", path: str | os.PathLike | None = None, download: bool = True
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> images uint8 (N, 28, 28), labels int64 (N,), class names (10)."""
    images, labels = load_idx_split(find_fashion_mnist(path, download), split)
    return images, labels, list(CLASSES)
