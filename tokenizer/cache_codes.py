"""Stage-one cache: tokenize an image dataset into HF `datasets` Parquet shards of sub-token indices.

    python -m tokenizer.cache_codes --tokenizer runs/tok/final --data /usr/share/datasets/fashion-mnist --split train \
        --class-names "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot" --out shards/fm-train
    accelerate launch --num_processes 8 -m tokenizer.cache_codes --tokenizer T --data /data/imagenet/train \
        --out shards/in1k --views ten-crop
    torchrun --nproc_per_node 2 -m tokenizer.cache_codes ...     # several CPU processes (gloo)

Output (--out):
  meta.json                       tokenizer config + sha256 of its weights, G, K, grid, views, image size, class names,
                                  source, shard list, counts (written / skipped as unreadable), complete flag
  data/codes-00000-of-00313.parquet ...
      codes  Array4D (V, h, w, G) in the smallest integer type holding K (uint8 / int16 / int32)
      label  ClassLabel(names=class names)
      index  int64, position of the source image in the dataset
      caption           string (with --caption-column NAME of a datasets source, --caption-sidecar: IMAGE.txt beside
                        each image of a folder, or caption_fn= from Python)
      caption_length    int32, valid caption-feature tokens n (with a caption encoder: `mgvq cache-codes
                        --caption-encoder T5_ID_OR_DIR`, or caption_features_fn= from Python)
      caption_features  Array2D (n, D) float16: the caption's n valid encoder rows in order (no padding; readers
                        left-pad them to the encoder's max_length T, recorded in meta.json "captions")

Views: "flip" (default, V=2): centre crop + its horizontal flip. "ten-crop" (V=20): LlamaGen's TenCrop (4 corners +
centre, then the same five of the flipped image) of the centre crop at int(size*1.1), then again at int(size*1.05).

Shard k holds the images [k*S, (k+1)*S) (S = --shard-size) and is written by rank k % world_size, so the shards do
not depend on the number of processes. Each shard is written atomically (temp name, then rename); a rerun skips the
shards that exist, so a killed run resumes with nothing lost or duplicated, even with another number of processes.
The last rank to finish writes the final meta.json (complete: true). Unreadable images are skipped and counted.
The output directory must be on a filesystem that all ranks share.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from runtime.fingerprint import sha256_file
from runtime.io import atomic_path, write_json
from runtime.outdir import RunLock, check_output_dir
from tokenizer.data import build_dataset, center_crop_arr, legacy_source

META_NAME = "meta.json"
FORMAT_NAME = "mgvq-codes"
FORMAT_VERSION = 1
TEN_CROP_RANGES = (1.1, 1.05)


# ---- small helpers ---------------------------------------------------------------------------------------------------
def code_dtype(codebook_size: int) -> str:
    """Smallest integer type holding indices in [0, K)."""
    if codebook_size <= 256:
        return "uint8"
    if codebook_size <= 2 ** 15:
        return "int16"
    if codebook_size <= 2 ** 31:
        return "int32"
    raise ValueError(f"codebook_size={codebook_size} does not fit the int32 code type; valid: 2 <= codebook_size "
                     f"<= 2**31")


# ---- views -----------------------------------------------------------------------------------------------------------
VIEW_MODES = ("flip", "ten-crop")


def view_names(mode: str) -> list[str]:
    if mode == "flip":
        return ["center", "center_flip"]
    if mode == "ten-crop":
        five = ["top_left", "top_right", "bottom_left", "bottom_right", "center"]
        return [f"{p}{s}@{r}" for r in TEN_CROP_RANGES for s in ("", "_flip") for p in five]
    raise ValueError(f"views={mode!r}: valid: {', '.join(VIEW_MODES)}")


def _five_crop(a: np.ndarray, s: int) -> list[np.ndarray]:
    """torchvision five_crop order on an (H, W, C) array: tl, tr, bl, br, centre."""
    h, w = a.shape[:2]
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))  # torchvision center_crop rounding
    return [a[:s, :s], a[:s, w - s:], a[h - s:, :s], a[h - s:, w - s:], a[top:top + s, left:left + s]]


def make_views(img: Image.Image, image_size: int, mode: str) -> np.ndarray:
    """RGB PIL image -> (V, 3, S, S) uint8 array of the augmented views."""
    if mode == "flip":
        a = center_crop_arr(img, image_size)
        views = [a, a[:, ::-1]]
    elif mode == "ten-crop":
        views = []
        for r in TEN_CROP_RANGES:
            a = center_crop_arr(img, int(image_size * r))
            views += _five_crop(a, image_size) + _five_crop(a[:, ::-1], image_size)
    else:
        raise ValueError(f"views={mode!r}: valid: {', '.join(VIEW_MODES)}")
    return np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2))


def to_model_input(views_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (LlamaGen Normalize(0.5, 0.5))."""
    return views_uint8.float().div_(127.5).sub_(1.0)


# ---- image sources ---------------------------------------------------------------------------------------------------
SPLIT_DIRS = {"train", "val", "validation", "test"}


def open_source(data: str, split: str = "train", label_column: str | None = None):
    """--data -> a tokenizer.data RobustImageDataset (its `decode(i)` raises on unreadable images, `labels`,
    `class_names`); its own training transform is not used here. A folder whose sub-folders are only split names
    (train/ val/ ...) is read at <data>/<split>; a folder of IDX files (MNIST layout) at its `split` (train | test)."""
    from tokenizer.data import is_idx_folder

    if os.path.isdir(data) and not is_idx_folder(data):
        subdirs = {d.name for d in os.scandir(data) if d.is_dir() and not d.name.startswith(".")}
        if subdirs and subdirs <= SPLIT_DIRS and not glob.glob(os.path.join(data, "**", "*.parquet"), recursive=True):
            if split not in subdirs:
                raise ValueError(f"--data {data!r} has split folders {sorted(subdirs)}; --split {split!r} is not one")
            data = os.path.join(data, split)
    elif not data.startswith("hf:") and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data!r} does not exist (valid: an image folder, a folder of IDX files, a "
                                "datasets save_to_disk dir, Parquet file(s) / a folder of them, 'hf:<name>')")
    src = build_dataset(data, image_size=8, train=False, split=split, label_column=label_column or "label")
    desc = {"data": data, "path": os.path.abspath(data) if os.path.exists(data) else None, "split": split,
            "kind": type(src).__name__}
    return src, desc


class _ViewsDataset(Dataset):
    """index -> (views uint8 (V, 3, S, S) or None if unreadable, label, index)."""

    def __init__(self, source, image_size: int, mode: str):
        self.source, self.image_size, self.mode = source, image_size, mode

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            img = self.source.decode(i)
            return torch.from_numpy(make_views(img, self.image_size, self.mode)), int(self.source.labels[i]), i
        except Exception as e:  # noqa: BLE001 - any failure to read one image means "skip and count", never crash
            return None, f"{self.source.describe(i)}: {e}"[:300], i


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = [(it[2], it[1]) for it in items if it[0] is None]
    if good:
        views = torch.stack([it[0] for it in good])
        labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
        index = torch.tensor([it[2] for it in good], dtype=torch.int64)
    else:
        views, labels, index = None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return views, labels, index, bad


# ---- shards ----------------------------------------------------------------------------------------------------------
def shard_name(k: int, n: int) -> str:
    return f"data/codes-{k:05d}-of-{n:05d}.parquet"


def shard_features(num_views: int, grid: tuple[int, int], groups: int, dtype: str, class_names: list[str],
                   captions: dict | None = None):
    import datasets

    cols = {
        "codes": datasets.Array4D(shape=(num_views, grid[0], grid[1], groups), dtype=dtype),
        "label": datasets.ClassLabel(names=list(class_names)),
        "index": datasets.Value("int64"),
    }
    if captions:
        cols["caption"] = datasets.Value("string")
        if captions.get("features"):
            cols["caption_length"] = datasets.Value("int32")
            cols["caption_features"] = datasets.Array2D(shape=(None, captions["features"]["dim"]), dtype="float16")
    return datasets.Features(cols)


def _caption_arrays(features, captions: list[str], cap_feats: list[np.ndarray] | None) -> list:
    """caption (+ caption_length, caption_features) Arrow columns; cap_feats: per image (n_i, D) float16 rows."""
    import pyarrow as pa

    arrays = [pa.array(list(captions), pa.string())]
    if "caption_features" in features:
        D = int(features["caption_features"].shape[1])
        lengths = np.array([len(f) for f in cap_feats], dtype=np.int32)
        flat = np.concatenate(cap_feats).astype(np.float16) if cap_feats else np.zeros((0, D), np.float16)
        rows = pa.ListArray.from_arrays(pa.array(np.arange(len(flat) + 1, dtype=np.int32) * D),
                                        pa.array(flat.reshape(-1)))
        outer = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), rows)
        arrays += [pa.array(lengths, pa.int32()),
                   pa.ExtensionArray.from_storage(features.arrow_schema.field("caption_features").type, outer)]
    return arrays


def shard_table(codes: np.ndarray, labels: np.ndarray, index: np.ndarray, features, captions: list[str] | None = None,
                cap_feats: list[np.ndarray] | None = None):
    """Arrow table with the HF schema (Array4D storage = nested lists), built from the flat buffers in O(1) Python
    (100x faster than datasets.Dataset.from_dict, which walks the rows)."""
    import pyarrow as pa

    schema = features.arrow_schema
    if codes.size >= 2 ** 31:
        raise ValueError(f"shard of {codes.shape} codes is too large for int32 list offsets; lower --shard-size")
    arr = pa.array(np.ascontiguousarray(codes).reshape(-1))
    for size in reversed(codes.shape[1:]):  # innermost (G) first, then w, h, V
        count = len(arr) // size
        arr = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * size), arr)
    extra = _caption_arrays(features, captions or [], cap_feats) if "caption" in features else []
    return pa.Table.from_arrays([pa.ExtensionArray.from_storage(schema.field("codes").type, arr),
                                 pa.array(labels, pa.int64()), pa.array(index, pa.int64())] + extra, schema=schema)


def write_shard(path: str, codes: np.ndarray, labels: np.ndarray, index: np.ndarray, features,
                captions: list[str] | None = None, cap_feats: list[np.ndarray] | None = None) -> None:
    """Write one shard atomically: a temp file in the same folder, then rename (a partial file is never visible)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(shard_table(codes, labels, index, features, captions, cap_feats), tmp)  # + the HF features


def _fixed_meta(tok, tok_sha: str, tokenizer: str, source, source_desc: dict, grid, image_size: int, views: str,
                precision: str, limit: int | None, shard_size: int, class_names: list[str],
                captions: dict | None = None) -> dict:
    cfg = tok.config
    n = len(source) if limit is None else min(limit, len(source))
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": {"path": os.path.abspath(tokenizer), "weights_sha256": tok_sha, "config": cfg.to_dict()},
        "groups": int(cfg.groups),
        "codebook_size": int(cfg.codebook_size),
        "grid": list(grid),
        "dtype": code_dtype(cfg.codebook_size),
        "image_size": int(image_size),
        "views": {"mode": views, "count": len(view_names(views)), "names": view_names(views),
                  **({"crop_ranges": list(TEN_CROP_RANGES)} if views == "ten-crop" else {})},
        "precision": precision,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "source": {**source_desc, "num_images": n},
        "shard_size": int(shard_size),
        "num_shards": (n + shard_size - 1) // shard_size,
        "captions": captions,
    }


_CHECKED = ("format", "version", "groups", "codebook_size", "grid", "dtype", "image_size", "views", "precision",
            "class_names", "source", "shard_size", "num_shards", "captions")


def check_existing_meta(out: str, fixed: dict) -> None:
    """Refuse to add to a shard directory written by another tokenizer or with other settings."""
    path = os.path.join(out, META_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    old_sha = old.get("tokenizer", {}).get("weights_sha256")
    new_sha = fixed["tokenizer"]["weights_sha256"]
    if old_sha != new_sha:
        raise ValueError(f"{out!r} holds codes of another tokenizer: meta.json weights_sha256={old_sha} "
                         f"({old.get('tokenizer', {}).get('path')}) but --tokenizer {fixed['tokenizer']['path']} "
                         f"has sha256={new_sha}; use a new --out (or delete {out!r})")
    for key in _CHECKED:
        if old.get(key) != fixed[key]:
            raise ValueError(f"{out!r} was written with {key}={old.get(key)!r} but this run has {key}="
                             f"{fixed[key]!r}; rerun with the same settings to resume, or use a new --out")


def finalize(out: str, fixed: dict) -> dict | None:
    """If every shard exists, count rows / skipped images and write meta.json with complete=true. Shards whose images
    were all unreadable hold no rows: they stay on disk (so a rerun skips them) but meta.json lists them under
    `empty_shards`, not `shards`, so every reader of `shards` gets only non-empty Parquet files."""
    import pyarrow.parquet as pq

    n_shards, n_images = fixed["num_shards"], fixed["source"]["num_images"]
    names = [shard_name(k, n_shards) for k in range(n_shards)]
    if not all(os.path.isfile(os.path.join(out, s)) for s in names):
        return None
    seen = np.zeros(n_images, dtype=bool)
    written, empty = 0, []
    for s in names:
        idx = pq.read_table(os.path.join(out, s), columns=["index"]).column("index").to_numpy()
        if len(idx) and (seen[idx].any() or len(np.unique(idx)) != len(idx)):
            raise RuntimeError(f"{s}: duplicate image indices across shards (corrupt shard directory {out!r})")
        seen[idx] = True
        written += len(idx)
        if not len(idx):
            empty.append(s)
    skipped = np.flatnonzero(~seen)
    meta = {**fixed, "shards": [s for s in names if s not in empty], "empty_shards": empty,
            "counts": {"images": n_images, "written": written, "skipped": int(len(skipped)),
                       "skipped_indices": skipped[:10000].tolist()},
            "complete": True}
    write_json(os.path.join(out, META_NAME), meta)
    return meta


# ---- main ------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgvq cache-codes",
        description="Tokenize an image dataset into HF `datasets` Parquet shards of MGVQ sub-token indices "
                    "(stage-one cache for generator training). Resumable; runs under accelerate / torchrun.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  mgvq cache-codes --tokenizer runs/tok/final --data imagenet/train --out shards/in1k\n"
               "  mgvq cache-codes --tokenizer runs/tok/final --data /usr/share/datasets/fashion-mnist --split train \\\n"
               "      --class-names 'T-shirt/top,Trouser,...,Ankle boot' --out shards/fm\n"
               "  accelerate launch --num_processes 8 -m tokenizer.cache_codes --tokenizer runs/tok/final \\\n"
               "      --data /data/imagenet/train --out shards/in1k-256 --views ten-crop --batch-size 64\n"
               "A killed run resumes when started again with the same arguments.")
    p.add_argument("--tokenizer", required=True, help="MGVQTokenizer.save_pretrained folder")
    p.add_argument("--data", required=True, help="an ImageNet-layout folder (root/<class>/<img>), a folder of IDX files "
                                                 "(MNIST layout), "
                                                 "a datasets save_to_disk dir, or Parquet file(s) / a folder of them")
    p.add_argument("--data-path", help=argparse.SUPPRESS)  # deprecated: with the old `--data fashion-mnist`
    p.add_argument("--split", default="train", help="split of IDX folders (train | test) / DatasetDicts / split "
                                                    "sub-folders")
    p.add_argument("--label-column", default=None, help="label column of a datasets source (default: 'label')")
    p.add_argument("--out", required=True, help="output folder (meta.json + data/*.parquet)")
    p.add_argument("--views", default="flip", choices=VIEW_MODES,
                   help="flip: centre crop + h-flip (V=2); ten-crop: LlamaGen ten-crop at 1.1 and 1.05 (V=20)")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: the tokenizer's image_size)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encode batch per process")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process for decoding")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="encode precision (bf16: CUDA)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (quick runs)")
    p.add_argument("--class-names", default=None, help="comma-separated class names replacing the source's (e.g. "
                                                        "for IDX files, which carry only class numbers)")
    p.add_argument("--caption-column", default=None, help="store each image's caption from this column of a "
                                                          "datasets source")
    p.add_argument("--caption-sidecar", action="store_true", help="store each image's caption from IMAGE.txt beside "
                                                                  "it (image folders)")
    p.add_argument("--caption-encoder", default=None, help="also store T5 caption features (fp16, with lengths): a "
                                                           "T5 / FLAN-T5 hub id or folder (e.g. google/flan-t5-xl)")
    p.add_argument("--caption-max-length", type=int, default=120, help="caption tokens T of the encoder (LlamaGen: "
                                                                       "120)")
    return p


def main(argv: list[str] | None = None, text_encoder_factory=None) -> int:
    """text_encoder_factory(name_or_path, max_length) -> a caption_features_fn (the pipelines-level `mgvq cache-codes`
    passes pipelines.text_encoder's T5 loader; tokenizer/ never imports it)."""
    args = _parser().parse_args(argv)
    features_fn = None
    if args.caption_encoder:
        if not (args.caption_column or args.caption_sidecar):
            raise ValueError("--caption-encoder needs captions: --caption-column NAME or --caption-sidecar")
        if text_encoder_factory is None:
            raise ValueError("--caption-encoder: run it as `mgvq cache-codes` (python -m pipelines.cache_codes), "
                             "which wires in the T5 encoder")
        features_fn = text_encoder_factory(args.caption_encoder, args.caption_max_length)
    class_names = None
    if args.class_names:
        class_names = [c.strip() for c in args.class_names.split(",")]
    data, legacy_split = legacy_source(args.data, args.data_path)
    run(tokenizer=args.tokenizer, data=data, out=args.out, split=legacy_split or args.split,
        label_column=args.label_column, views=args.views, image_size=args.image_size, batch_size=args.batch_size,
        shard_size=args.shard_size, num_workers=args.num_workers, precision=args.precision, limit=args.limit,
        class_names=class_names, caption_column=args.caption_column, caption_sidecar=args.caption_sidecar,
        caption_features_fn=features_fn,
        caption_features_desc={"encoder": args.caption_encoder} if args.caption_encoder else None)
    return 0


def _check_settings(batch_size: int, shard_size: int, num_workers: int, limit: int | None, image_size: int | None,
                    views: str, precision: str) -> None:
    for flag, v, low in (("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                         ("--num-workers", num_workers, 0), ("--limit", limit, 1), ("--image-size", image_size, 1)):
        if v is not None and v < low:
            raise ValueError(f"{flag}={v}: must be >= {low}")
    if views not in VIEW_MODES:
        raise ValueError(f"--views={views!r}: valid: {', '.join(VIEW_MODES)}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision={precision!r}: valid: fp32, bf16 (CUDA)")


def _load_tokenizer(tokenizer: str, device):
    from tokenizer.model import MGVQTokenizer

    weights = os.path.join(tokenizer, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--tokenizer {tokenizer!r}: no model.safetensors (expected a "
                                "MGVQTokenizer.save_pretrained folder)")
    return MGVQTokenizer.from_pretrained(tokenizer, device=device).eval(), sha256_file(weights)


def run(*, tokenizer: str, data: str, out: str, split: str = "train", label_column: str | None = None,
        views: str = "flip", image_size: int | None = None, batch_size: int = 64,
        shard_size: int = 4096, num_workers: int = 2, precision: str = "fp32", limit: int | None = None,
        class_names: list[str] | None = None, caption_column: str | None = None, caption_sidecar: bool = False,
        caption_fn=None, caption_desc: str | None = None, caption_features_fn=None,
        caption_features_desc: dict | None = None) -> dict:
    """The whole extraction for this process (rank); returns its stats (images, seconds in the encode loop, shards,
    skipped, complete). Arguments as the command line's (see `mgvq cache-codes --help`); `class_names` replaces the
    source's class names (e.g. Fashion-MNIST's, whose IDX files carry only numbers).

    Captions (one source at most): caption_column (a datasets source's column), caption_sidecar (IMAGE.txt beside each
    image of a folder) or caption_fn(index, label) -> str (with caption_desc naming it in meta.json, which a resumed
    run must match). caption_features_fn(list of captions) -> (features (B, T, D), mask (B, T) bool), left-padded
    (e.g. pipelines.text_encoder.T5TextEncoder): each image's valid rows are stored in float16 with their count."""
    _check_settings(batch_size, shard_size, num_workers, limit, image_size, views, precision)
    if sum([caption_column is not None, bool(caption_sidecar), caption_fn is not None]) > 1:
        raise ValueError("captions: give one of caption_column, caption_sidecar, caption_fn")
    if caption_features_fn is not None and caption_column is None and not caption_sidecar and caption_fn is None:
        raise ValueError("caption_features_fn needs captions: caption_column, caption_sidecar or caption_fn")
    check_output_dir(out, what="--out")  # before any loading: an unwritable --out fails now, not after hours
    from runtime.accel import build_accelerator

    # ranks never wait on each other; the timeout is loose
    acc = build_accelerator("fp32", trackers=None, timeout_s=6 * 3600)
    tok, tok_sha = _load_tokenizer(tokenizer, acc.device if acc.device.type == "cuda" else "cpu")
    f = tok.config.downsample
    image_size = image_size or tok.config.image_size
    if image_size % f:
        raise ValueError(f"--image-size={image_size}: must be a multiple of the tokenizer's downsample {f}")
    if precision == "bf16" and acc.device.type != "cuda":
        raise ValueError("--precision bf16 needs a CUDA device; use fp32 on CPU")
    source, source_desc = open_source(data, split, label_column)
    names = list(class_names) if class_names is not None else list(source.class_names)
    if len(names) < len(source.class_names):
        raise ValueError(f"class_names: {len(names)} names for {len(source.class_names)} classes in {data!r}")
    grid = (image_size // f, image_size // f)
    get_caption, captions_meta = _caption_source(source, caption_column, caption_sidecar, caption_fn, caption_desc,
                                                 caption_features_fn, caption_features_desc)
    fixed = _fixed_meta(tok, tok_sha, tokenizer, source, source_desc, grid, image_size, views, precision, limit,
                        shard_size, names, captions_meta)
    n_bytes = fixed["source"]["num_images"] * fixed["views"]["count"] * grid[0] * grid[1] * tok.config.groups
    check_output_dir(out, need_bytes=n_bytes * np.dtype(fixed["dtype"]).itemsize, what="--out")  # uncompressed
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    check_existing_meta(out, fixed)
    if not os.path.isfile(os.path.join(out, META_NAME)):  # every rank may write it: the content is identical
        write_json(os.path.join(out, META_NAME), {**fixed, "complete": False})
    with RunLock(out, "--out", enabled=acc.is_main_process):
        stats = _encode_my_shards(acc, tok, source, fixed, out, batch_size, num_workers, get_caption,
                                  caption_features_fn)
    meta = finalize(out, fixed)  # the last rank to finish sees every shard and writes the final meta.json
    if meta is not None:
        c = meta["counts"]
        print(f"cache-codes: complete: {c['written']} images written, {c['skipped']} skipped as unreadable "
              f"({fixed['num_shards']} shards in {out!r}, {len(meta['empty_shards'])} of them empty)", file=sys.stderr)
    return {**stats, "complete": meta is not None}


def _caption_source(source, column, sidecar, fn, desc, features_fn, features_desc):
    """(index -> caption or None, the meta.json "captions" entry or None)."""
    if column is None and not sidecar and fn is None:
        return None, None
    if column is not None:
        ds = getattr(source, "ds", None)
        if ds is None or column not in ds.column_names:
            have = ds.column_names if ds is not None else f"none: {type(source).__name__} is not a datasets source"
            raise ValueError(f"--caption-column {column!r}: not a column of the source (columns: {have})")
        texts = [str(t) for t in ds[column]]
        get, what = (lambda i, label: texts[i]), f"column:{column}"
    elif sidecar:
        paths = getattr(source, "paths", None)
        if paths is None:
            raise ValueError(f"--caption-sidecar needs an image folder source (IMAGE.txt beside each image); "
                             f"{type(source).__name__} has no image files")

        def get(i, label):
            txt = os.path.splitext(paths[i])[0] + ".txt"
            if not os.path.isfile(txt):
                raise FileNotFoundError(f"--caption-sidecar: {txt} not found (a caption file beside {paths[i]})")
            with open(txt, encoding="utf-8") as fh:
                return " ".join(fh.read().split())
        what = "sidecar:.txt"
    else:
        get, what = fn, f"function:{desc or getattr(fn, '__name__', 'caption_fn')}"
    meta = {"source": what, "features": None}
    if features_fn is not None:
        feats, mask = features_fn(["a"])  # probe: T and D of the encoder's left-padded output
        meta["features"] = {"dim": int(feats.shape[-1]), "max_length": int(feats.shape[1]), "dtype": "float16",
                            "padding": "left", **(features_desc or {})}
    return get, meta


class _ShardWriter:
    """Accumulates one shard's codes (on the device: no sync per batch) and writes finished shards from one
    background thread (pyarrow releases the GIL) while the next shard is encoded; at most one write is pending."""

    def __init__(self, out: str, fixed: dict, features):
        self.out, self.fixed, self.features = out, fixed, features
        self.n, self.S = fixed["source"]["num_images"], fixed["shard_size"]
        self.torch_dtype = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}[fixed["dtype"]]
        self.pool, self.pending, self.written = ThreadPoolExecutor(max_workers=1), None, 0
        self.cur, self.remaining = None, 0
        self.codes, self.labels, self.index, self.captions, self.cap_feats = [], [], [], [], []

    def add(self, k: int, count: int, codes=None, labels=None, index=None, captions=None, cap_feats=None) -> None:
        """`count` images of shard k done (`codes` etc. for the readable ones); writes the shard when complete."""
        if self.cur is None:
            self.cur, self.remaining = k, min((k + 1) * self.S, self.n) - k * self.S
        assert k == self.cur, f"batch of shard {k} while shard {self.cur} is open"
        if codes is not None:
            self.codes.append(codes.to(self.torch_dtype))
            self.labels.append(labels.numpy())
            self.index.append(index.numpy())
            self.captions += list(captions or [])
            self.cap_feats += list(cap_feats or [])
        self.remaining -= count
        if self.remaining == 0:
            f = self.fixed
            empty = np.zeros((0, f["views"]["count"], *f["grid"], f["groups"]), np.dtype(f["dtype"]))
            codes = torch.cat(self.codes).cpu().numpy() if self.codes else empty
            self.drain()
            self.pending = self.pool.submit(
                write_shard, os.path.join(self.out, shard_name(self.cur, f["num_shards"])), codes,
                np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64),
                np.concatenate(self.index) if self.index else np.zeros(0, np.int64), self.features,
                self.captions, self.cap_feats if f.get("captions") and f["captions"].get("features") else None)
            self.codes, self.labels, self.index, self.captions, self.cap_feats, self.cur = [], [], [], [], [], None

    def drain(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises a failed write
            self.pending, self.written = None, self.written + 1

    def close(self) -> None:
        self.drain()
        self.pool.shutdown()


def _encode_my_shards(acc, tok, source, fixed: dict, out: str, batch_size: int, num_workers: int, get_caption=None,
                      caption_features_fn=None) -> dict:
    """Encode and write the shards this rank owns (k % world == rank) that do not exist yet."""
    from tqdm import tqdm

    rank, world = acc.process_index, acc.num_processes
    n, S, n_shards, V = fixed["source"]["num_images"], fixed["shard_size"], fixed["num_shards"], fixed["views"]["count"]
    mine = list(range(rank, n_shards, world))
    for k in mine:  # partial files of a killed run (only this rank writes these shards, so none is in use)
        for stale in glob.glob(os.path.join(out, "data", f".tmp-*-{os.path.basename(shard_name(k, n_shards))}")):
            os.remove(stale)
    todo = [k for k in mine if not os.path.isfile(os.path.join(out, shard_name(k, n_shards)))]
    batches = [list(range(s, min(s + batch_size, (k + 1) * S, n)))
               for k in todo for s in range(k * S, min((k + 1) * S, n), batch_size)]
    features = shard_features(V, fixed["grid"], fixed["groups"], fixed["dtype"], fixed["class_names"],
                              fixed.get("captions"))
    loader = DataLoader(_ViewsDataset(source, fixed["image_size"], fixed["views"]["mode"]), batch_sampler=batches,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=acc.device.type == "cuda",
                        persistent_workers=False)
    todo_images = sum(len(b) for b in batches)
    if acc.is_main_process:
        print(f"cache-codes: {n} images -> {n_shards} shards of {S} in {out!r}; rank {rank}/{world}: "
              f"{len(todo)}/{len(mine)} shards to write ({len(mine) - len(todo)} already done); V={V}, "
              f"G={fixed['groups']}, K={fixed['codebook_size']}, grid={tuple(fixed['grid'])}, codes {fixed['dtype']}",
              file=sys.stderr)
    bar = tqdm(total=todo_images, unit="img", disable=not acc.is_local_main_process, smoothing=0.05,
               desc=f"rank {rank} encoding", dynamic_ncols=True)
    writer, skipped = _ShardWriter(out, fixed, features), 0
    t0, t_first = time.perf_counter(), None
    for views, labels, index, bad in loader:
        t_first = t_first or time.perf_counter()  # worker start-up + first batch (pipeline fill)
        k = (int(index[0]) if len(index) else bad[0][0]) // S
        codes = None
        if views is not None:
            x = to_model_input(views.to(acc.device, non_blocking=True).flatten(0, 1))
            with torch.autocast("cuda", dtype=torch.bfloat16) if fixed["precision"] == "bf16" else nullcontext():
                idx = tok.encode(x)
            codes = idx.view(len(index), V, *idx.shape[1:])
        captions = cap_feats = None
        if get_caption is not None and len(index):
            captions = [get_caption(int(i), int(y)) for i, y in zip(index, labels)]
            if caption_features_fn is not None:  # left-padded: keep each row's last n (valid) rows, float16
                feats, mask = caption_features_fn(captions)
                feats = feats.to(torch.float16).cpu().numpy()
                cap_feats = [feats[b, feats.shape[1] - n:] for b, n in enumerate(mask.sum(1).tolist())]
        for i, why in bad:
            tqdm.write(f"rank {rank}: skipping unreadable image {i}: {why}", file=sys.stderr)
        skipped += len(bad)
        writer.add(k, len(index) + len(bad), codes, labels, index, captions, cap_feats)
        bar.update(len(index) + len(bad))
    writer.close()
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    print(f"cache-codes: rank {rank}/{world} wrote shards {todo} ({skipped} unreadable images skipped)",
          file=sys.stderr)
    return {"images": todo_images, "seconds": seconds, "fill_seconds": (t_first or t0) - t0, "shards": writer.written,
            "skipped": skipped}


if __name__ == "__main__":
    sys.exit(main())
