"""Image data for stage-one training: folders, HF `datasets` images, IDX folders, scikit-image photo crops.

Every dataset item is a dict {"image": (3, S, S) float32 in [-1, 1], "label": int, "failed": int}. Unreadable,
truncated, zero-byte or non-image files never crash training: the item is replaced by the next readable index and
`failed` says how many files were skipped to get it (the training script sums it into a counter). Grayscale, palette,
RGBA / LA (composited on white), CMYK and 16-bit / float images are converted to 8-bit RGB.

Augmentation (LlamaGen `dataset/augmentation.py`, reference B.8):
  "random_crop"  random_crop_arr: short side resized to a random size in [S/max_frac, S/min_frac] = [S, S/0.8]
                 (BOX halving first, then BICUBIC), random S x S crop; + horizontal flip        (training)
  "center_crop"  ADM center_crop_arr: short side to S, centre S x S crop                         (evaluation)
  "resize"       plain BICUBIC resize to S x S (+ flip in training); for small full-frame datasets (IDX folders)

Reproducibility: `ResumableBatchSampler` yields, for training step s, the same batch of (index, augmentation seed)
pairs whatever the number of dataloader workers, so a run resumed at step s sees exactly the data of an uninterrupted
run; its state is just (seed, step).

Sources (`build_dataset(source, ...)`):
  a folder of IDX files                    MNIST layout (train-images-idx3-ubyte[.gz], t10k-...), split train | test,
                                           e.g. /usr/share/datasets/fashion-mnist (the demo's data: pipelines/)
  "skimage"                                random crops of the colour photos bundled with scikit-image (offline)
  a folder                                 ImageNet layout (one subfolder per class) or a flat folder of images
  a `save_to_disk` folder / *.parquet / a folder of parquet files / "hf:<name or path>"   HF `datasets` images
"""
from __future__ import annotations

import gzip
import io
import math
import os
import random
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error (counted), not silently grey-padded

IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
AUGMENTATIONS = ("random_crop", "center_crop", "resize")
MAX_REPLACEMENTS = 64


class ImageDecodeError(ValueError):
    pass


# ---- decoding --------------------------------------------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit / 32-bit int and float images are rescaled from their own range."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 65535.0
        elif img.mode == "I":
            hi = 65535.0 if a.max() > 255 else 255.0  # PNG 16-bit greyscale opens as "I"
            a = a / hi
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(src: str | os.PathLike | bytes) -> Image.Image:
    """Decode a path or bytes into a fully loaded RGB image; raises ImageDecodeError with the reason."""
    name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        if isinstance(src, (bytes, bytearray)):
            if len(src) == 0:
                raise ImageDecodeError(f"{name}: zero bytes")
            img = Image.open(io.BytesIO(src))
        else:
            if os.path.getsize(src) == 0:
                raise ImageDecodeError(f"{name}: zero-byte file")
            img = Image.open(src)
        img.load()
        if img.width < 1 or img.height < 1:
            raise ImageDecodeError(f"{name}: empty image {img.size}")
        return to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file (PIL also raises e.g. NotImplementedError)
        raise ImageDecodeError(f"{name}: {type(e).__name__}: {e}") from e


# ---- augmentation (LlamaGen / ADM) -----------------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM: BOX-halve while the short side >= 2S, BICUBIC resize short side to S, centre crop -> uint8 (S, S, 3)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def random_crop_arr(pil_image: Image.Image, image_size: int, rng: random.Random, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0) -> np.ndarray:
    """LlamaGen random_crop_arr: short side to a random size in [ceil(S/max_frac), ceil(S/min_frac)], random crop."""
    lo, hi = math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)
    smaller = rng.randrange(lo, hi + 1)
    while min(*pil_image.size) >= 2 * smaller:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y = rng.randrange(arr.shape[0] - image_size + 1)
    x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[y:y + image_size, x:x + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageTransform:
    """PIL RGB image + random.Random -> (3, S, S) tensor in [-1, 1]."""

    def __init__(self, image_size: int, augmentation: str = "random_crop", hflip: bool = True,
                 min_crop_frac: float = 0.8, max_crop_frac: float = 1.0):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0 < min_crop_frac <= max_crop_frac <= 1:
            raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}")
        self.image_size, self.augmentation, self.hflip = image_size, augmentation, hflip
        self.min_crop_frac, self.max_crop_frac = min_crop_frac, max_crop_frac

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        S = self.image_size
        if self.augmentation == "random_crop":
            arr = random_crop_arr(img, S, rng, self.min_crop_frac, self.max_crop_frac)
        elif self.augmentation == "center_crop":
            arr = center_crop_arr(img, S)
        else:
            arr = np.array(img if img.size == (S, S) else img.resize((S, S), resample=Image.BICUBIC))
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr)


# ---- datasets --------------------------------------------------------------------------------------------------------
def _aug_seed(key) -> tuple[int, int]:
    """Dataset key: int index, or (index, augmentation seed) from ResumableBatchSampler."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), int(key)


class RobustImageDataset(Dataset):
    """Base: subclasses implement `__len__`, `raw(i)` (path / bytes / PIL image) and `labels`.

    A file that fails to decode is skipped: the next index (cyclically) is used instead and the item's "failed"
    counts the skipped files. `self.failures` counts them in this process (with num_workers=0)."""

    labels: Sequence[int]
    class_names: list[str]

    def __init__(self, transform: Callable[[Image.Image, random.Random], torch.Tensor]):
        self.transform = transform
        self.failures = 0
        self.bad: set[int] = set()

    def raw(self, i: int):
        raise NotImplementedError

    def decode(self, i: int) -> Image.Image:
        src = self.raw(i)
        return to_rgb(src) if isinstance(src, Image.Image) else load_rgb(src)

    def __getitem__(self, key) -> dict:
        idx, seed = _aug_seed(key)
        n = len(self)
        failed = 0
        for j in range(min(n, MAX_REPLACEMENTS)):
            i = (idx + j) % n
            if i in self.bad:
                continue
            try:
                img = self.decode(i)
            except ImageDecodeError:
                self.bad.add(i)
                self.failures += 1
                failed += 1
                continue
            return {"image": self.transform(img, random.Random(seed)), "label": int(self.labels[i]), "failed": failed}
        raise RuntimeError(f"{type(self).__name__}: no readable image among {min(n, MAX_REPLACEMENTS)} files from "
                           f"index {idx} ({failed} failed to decode; e.g. {self.describe(idx)})")

    def describe(self, i: int) -> str:
        return f"index {i}"

    def scan(self) -> tuple[int, list[int]]:
        """Decode every file once: (number readable, indices of the unreadable ones)."""
        bad = []
        for i in range(len(self)):
            try:
                self.decode(i)
            except ImageDecodeError:
                bad.append(i)
        return len(self) - len(bad), bad


class ImageFolderDataset(RobustImageDataset):
    """ImageNet layout (root/<class>/**/<image>; labels = sorted class folder order) or a flat folder (label 0)."""

    def __init__(self, root: str | os.PathLike, transform, extensions: Sequence[str] = IMAGE_EXTS):
        super().__init__(transform)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        exts = tuple(e.lower() for e in extensions)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files: list[tuple[str, int]] = []
        if classes:
            self.layout = "imagenet"
            for c, name in enumerate(classes):
                for dirpath, dirnames, fnames in os.walk(root / name):
                    dirnames.sort()
                    files += [(os.path.join(dirpath, f), c) for f in sorted(fnames) if f.lower().endswith(exts)]
        else:
            self.layout = "flat"
            files = [(str(p), 0) for p in sorted(root.iterdir()) if p.is_file() and p.name.lower().endswith(exts)]
        if not files:
            raise FileNotFoundError(f"no images with extensions {list(exts)} under {root}")
        self.root, self.class_names = root, classes or [root.name]
        self.paths = [f for f, _ in files]
        self.labels = [c for _, c in files]

    def __len__(self):
        return len(self.paths)

    def raw(self, i):
        return self.paths[i]

    def describe(self, i):
        return self.paths[i % len(self)]


class HFImageDataset(RobustImageDataset):
    """A HF `datasets.Dataset` with an image column (decoded here, robustly, from its bytes / path)."""

    def __init__(self, ds, transform, image_column: str | None = None, label_column: str | None = "label"):
        super().__init__(transform)
        import datasets

        if image_column is None:
            cands = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
            if not cands:
                raise ValueError(f"no Image column in dataset features {dict(ds.features)}; pass image_column=")
            image_column = cands[0]
        if image_column not in ds.column_names:
            raise ValueError(f"image_column {image_column!r} not in columns {ds.column_names}")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column = ds, image_column
        if label_column and label_column in ds.column_names:
            self.labels = [int(v) for v in ds[label_column]]
            feat = ds.features[label_column]
            self.class_names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else \
                [str(c) for c in range(max(self.labels) + 1)]
        else:
            self.labels, self.class_names = [0] * len(ds), ["image"]

    def __len__(self):
        return len(self.ds)

    def raw(self, i):
        v = self.ds[int(i)][self.image_column]
        if isinstance(v, dict):
            if v.get("bytes"):
                return v["bytes"]
            if v.get("path"):
                return v["path"]
            return b""
        if isinstance(v, (bytes, bytearray, Image.Image)):
            return v
        if isinstance(v, str):
            return v
        if isinstance(v, np.ndarray):
            return Image.fromarray(v)
        raise ImageDecodeError(f"row {i}: unsupported image value of type {type(v).__name__}")


class ArrayImageDataset(RobustImageDataset):
    """In-memory uint8 images (N, H, W) greyscale or (N, H, W, 3) RGB, or a list of such arrays."""

    def __init__(self, images, labels, class_names: list[str], transform):
        super().__init__(transform)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.class_names = images, [int(v) for v in labels], class_names

    def __len__(self):
        return len(self.images)

    def raw(self, i):
        return Image.fromarray(np.asarray(self.images[i]))


# ---- IDX folders (the MNIST family's format) --------------------------------------------------------------------------
IDX_SPLITS = {"train": "train", "test": "t10k"}  # split -> file prefix: <prefix>-images-idx3-ubyte[.gz] + -labels-idx1-


def _idx_file(d: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def is_idx_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding train-images-idx3-ubyte[.gz] (MNIST / Fashion-MNIST layout)."""
    return Path(path).is_dir() and _idx_file(Path(path), "train-images-idx3-ubyte") is not None


def legacy_source(data: str, folder: str | None = None) -> tuple[str, str | None]:
    """Deprecated `fashion-mnist[:split]` (+ a folder given as data_path / --data-path) -> (IDX folder, split)."""
    if not (data == "fashion-mnist" or data.startswith("fashion-mnist:")):
        return data, None
    import sys
    import warnings

    msg = (f"data={data!r} is deprecated: pass the folder of IDX files instead (data=<folder>, split via "
           f"data_split= / --split; class names via --class-names for cache-codes)")
    warnings.warn(msg, FutureWarning, stacklevel=2)
    print(f"warning: {msg}", file=sys.stderr)
    return folder or "/usr/share/datasets/fashion-mnist", data.split(":", 1)[1] if ":" in data else None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX (MNIST format) file, optionally gzipped, as a uint8 array."""
    path = str(path)
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {arr.size} bytes")
    return arr.reshape(shape)


def load_idx_split(folder: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """-> images uint8 (N, H, W), labels int64 (N,) of a split ("train" | "test") of an IDX folder."""
    if split not in IDX_SPLITS:
        raise ValueError(f"IDX split must be one of {list(IDX_SPLITS)}, got {split!r}")
    d, prefix = Path(folder), IDX_SPLITS[split]
    img, lab = _idx_file(d, f"{prefix}-images-idx3-ubyte"), _idx_file(d, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise FileNotFoundError(f"{prefix}-images-idx3-ubyte / {prefix}-labels-idx1-ubyte (.gz or not) not found "
                                f"in {folder}")
    images, labels = read_idx(img), read_idx(lab).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{folder} {split}: bad shapes images {images.shape} labels {labels.shape}")
    return images, labels


# ---- scikit-image photos ---------------------------------------------------------------------------------------------
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field",
                  "immunohistochemistry", "cat")


def skimage_photos() -> list[np.ndarray]:
    """The colour photos bundled in the scikit-image wheel (uint8 HWC, offline)."""
    from skimage import data

    out = []
    for name in SKIMAGE_PHOTOS:
        img = getattr(data, name)()
        out.append(img[0] if isinstance(img, tuple) else img)  # stereo_motorcycle -> (left, right, disp)
    return out


def skimage_crops(n: int, image_size: int, seed: int = 0, scales: tuple[float, float] = (0.25, 0.5),
                  photos: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n random image_size crops of the photos, each photo first BOX-resized by one of 4 factors spanning `scales`.

    Returns uint8 (n, S, S, 3) and the photo index of each crop as its label."""
    photos = list(photos) if photos is not None else skimage_photos()
    rng = np.random.default_rng(seed)
    levels = np.linspace(scales[0], scales[1], 4)  # each photo resized once per level, then cropped
    pyramid = []
    for p in photos:
        img = Image.fromarray(p)
        pyramid.append([np.asarray(img.resize((max(image_size, round(img.width * s)),
                                               max(image_size, round(img.height * s))), resample=Image.BOX))
                        for s in levels])
    out = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = rng.integers(0, len(photos), n)
    for k, p in enumerate(labels):
        small = pyramid[p][rng.integers(0, len(levels))]
        h, w = small.shape[:2]
        y, x = rng.integers(0, h - image_size + 1), rng.integers(0, w - image_size + 1)
        out[k] = small[y:y + image_size, x:x + image_size]
    return out, labels.astype(np.int64)


# ---- source dispatch -------------------------------------------------------------------------------------------------
def _load_hf(source: str, split: str):
    import datasets

    spec = source[3:] if source.startswith("hf:") else source
    p = Path(spec)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                       or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_file() and p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    elif p.is_dir() and sorted(p.rglob("*.parquet")):
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in sorted(p.rglob("*.parquet"))],
                                   split="train")
    elif source.startswith("hf:"):
        ds = datasets.load_dataset(spec, split=split)
    else:
        raise ValueError(f"{source!r} is not a dataset folder / parquet file")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split {split!r} not in {source} (splits: {list(ds)})")
        ds = ds[split]
    return ds


def build_dataset(source: str, image_size: int, train: bool = True, split: str | None = None,
                  augmentation: str | None = None, hflip: bool | None = None, image_column: str | None = None,
                  label_column: str | None = "label", num_crops: int = 4096, seed: int = 0,
                  class_names: Sequence[str] | None = None) -> RobustImageDataset:
    """One entry point for every source (see the module docstring). `augmentation` defaults to "random_crop" for
    training and "center_crop" for evaluation ("resize" for IDX folders; skimage crops are already S x S).
    `class_names`: names of an IDX folder's classes (its files carry only numbers)."""
    hflip = train if hflip is None else hflip
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        raise ValueError(f"data={source!r}: Fashion-MNIST is the demo's dataset (pipelines/fashion_mnist.py) and no "
                         f"longer a built-in name; pass its folder of IDX files instead, e.g. "
                         f"data=/usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist)")
    if is_idx_folder(source):
        images, labels = load_idx_split(source, split or ("train" if train else "test"))
        names = list(class_names) if class_names else [str(i) for i in range(int(labels.max()) + 1)]
        return ArrayImageDataset(images, labels, names, ImageTransform(image_size, augmentation or "resize", hflip))
    if source == "skimage":
        images, labels = skimage_crops(num_crops, image_size, seed=seed if train else seed + 1)
        return ArrayImageDataset(images, labels, list(SKIMAGE_PHOTOS),
                                 ImageTransform(image_size, augmentation or "resize", hflip))
    transform = ImageTransform(image_size, augmentation or ("random_crop" if train else "center_crop"), hflip)
    p = Path(source)
    if source.startswith("hf:") or p.suffix == ".parquet" or (p.is_dir() and (
            (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()
            or any(p.glob("*.parquet")) or any(p.glob("*/*.parquet")))):
        ds = _load_hf(source, split or ("train" if train else "validation"))
        return HFImageDataset(ds, transform, image_column, label_column)
    if p.is_dir():
        return ImageFolderDataset(p, transform)
    raise FileNotFoundError(f"data source {source!r} is not 'skimage', an image folder, a folder of IDX files (MNIST "
                            f"layout), a datasets folder (save_to_disk), a parquet file / folder, or 'hf:<name>'")


# ---- resumable sampling ----------------------------------------------------------------------------------------------
class ResumableBatchSampler(Sampler):
    """Infinite batch sampler: step s -> epoch e = s // steps_per_epoch, a seeded permutation per epoch, this rank's
    slice of the global batch. Yields lists of (index, augmentation seed). State = (seed, start_step)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n < batch_size * world_size:
            raise ValueError(f"dataset has {n} images, fewer than one global batch ({batch_size} x {world_size} "
                             f"processes)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.steps_per_epoch = n // (batch_size * world_size)

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, b = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        start = (b * self.world_size + self.rank) * self.batch_size
        idx = perm[start:start + self.batch_size].tolist()
        return [(i, (self.seed * 1_000_003 + epoch) * 10_000_019 + i) for i in idx]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def __len__(self):  # infinite; DataLoader only needs it for len(loader)
        return 2**62


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "failed": sum(it["failed"] for it in items)}
