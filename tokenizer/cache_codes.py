"""Stage-one cache: tokenize an image dataset into HF `datasets` Parquet shards of sub-token indices.

    python -m tokenizer.cache_codes --tokenizer runs/tok/final --data fashion-mnist --split train --out shards/fm-train
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
import hashlib
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tokenizer.data import build_dataset, center_crop_arr
from tokenizer.outdir import check_output_dir

META_NAME = "meta.json"
FORMAT_NAME = "mgvq-codes"
FORMAT_VERSION = 1
TEN_CROP_RANGES = (1.1, 1.05)
_STOP_ENV = "MGVQ_CACHE_KILL_AFTER_SHARDS"  # test hook: SIGKILL this process after writing that many shards


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


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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


def open_source(data: str, split: str = "train", label_column: str | None = None, data_path: str | None = None):
    """--data -> a tokenizer.data RobustImageDataset (its `decode(i)` raises on unreadable images, `labels`,
    `class_names`); its own training transform is not used here. A folder whose sub-folders are only split names
    (train/ val/ ...) is read at <data>/<split>. `data_path`: where the Fashion-MNIST IDX files are (default: the
    Debian folder, then the cache, then a download)."""
    if data == "fashion-mnist":
        data = f"fashion-mnist:{split}"
    elif os.path.isdir(data):
        subdirs = {d.name for d in os.scandir(data) if d.is_dir() and not d.name.startswith(".")}
        if subdirs and subdirs <= SPLIT_DIRS and not glob.glob(os.path.join(data, "**", "*.parquet"), recursive=True):
            if split not in subdirs:
                raise ValueError(f"--data {data!r} has split folders {sorted(subdirs)}; --split {split!r} is not one")
            data = os.path.join(data, split)
    elif not data.startswith(("fashion-mnist", "hf:")) and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data!r} does not exist (valid: 'fashion-mnist', an image folder, a "
                                "datasets save_to_disk dir, Parquet file(s) / a folder of them, 'hf:<name>')")
    src = build_dataset(data, image_size=8, train=False, split=split, label_column=label_column or "label",
                        path=data_path if data.startswith("fashion-mnist") else None)
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


def shard_features(num_views: int, grid: tuple[int, int], groups: int, dtype: str, class_names: list[str]):
    import datasets

    return datasets.Features({
        "codes": datasets.Array4D(shape=(num_views, grid[0], grid[1], groups), dtype=dtype),
        "label": datasets.ClassLabel(names=list(class_names)),
        "index": datasets.Value("int64"),
    })


def shard_table(codes: np.ndarray, labels: np.ndarray, index: np.ndarray, features):
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
    return pa.Table.from_arrays([pa.ExtensionArray.from_storage(schema.field("codes").type, arr),
                                 pa.array(labels, pa.int64()), pa.array(index, pa.int64())], schema=schema)


def write_shard(path: str, codes: np.ndarray, labels: np.ndarray, index: np.ndarray, features) -> None:
    """Write one shard atomically: a temp file in the same folder, then rename (a partial file is never visible)."""
    import pyarrow.parquet as pq

    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    pq.write_table(shard_table(codes, labels, index, features), tmp)  # schema metadata carries the HF features
    os.replace(tmp, path)


def _fixed_meta(args, tok, tok_sha, source, source_desc, grid) -> dict:
    cfg = tok.config
    n = len(source) if args.limit is None else min(args.limit, len(source))
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": {"path": os.path.abspath(args.tokenizer), "weights_sha256": tok_sha, "config": cfg.to_dict()},
        "groups": int(cfg.groups),
        "codebook_size": int(cfg.codebook_size),
        "grid": list(grid),
        "dtype": code_dtype(cfg.codebook_size),
        "image_size": int(args.image_size),
        "views": {"mode": args.views, "count": len(view_names(args.views)), "names": view_names(args.views),
                  **({"crop_ranges": list(TEN_CROP_RANGES)} if args.views == "ten-crop" else {})},
        "precision": args.precision,
        "class_names": list(source.class_names),
        "num_classes": len(source.class_names),
        "source": {**source_desc, "num_images": n},
        "shard_size": int(args.shard_size),
        "num_shards": (n + args.shard_size - 1) // args.shard_size,
    }


_CHECKED = ("format", "version", "groups", "codebook_size", "grid", "dtype", "image_size", "views", "precision",
            "class_names", "source", "shard_size", "num_shards")


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
    """If every shard exists, count rows / skipped images and write meta.json with complete=true."""
    import pyarrow.parquet as pq

    n_shards, n_images = fixed["num_shards"], fixed["source"]["num_images"]
    names = [shard_name(k, n_shards) for k in range(n_shards)]
    if not all(os.path.isfile(os.path.join(out, s)) for s in names):
        return None
    seen = np.zeros(n_images, dtype=bool)
    written = 0
    for s in names:
        idx = pq.read_table(os.path.join(out, s), columns=["index"]).column("index").to_numpy()
        if len(idx) and (seen[idx].any() or len(np.unique(idx)) != len(idx)):
            raise RuntimeError(f"{s}: duplicate image indices across shards (corrupt shard directory {out!r})")
        seen[idx] = True
        written += len(idx)
    skipped = np.flatnonzero(~seen)
    meta = {**fixed, "shards": names,
            "counts": {"images": n_images, "written": written, "skipped": int(len(skipped)),
                       "skipped_indices": skipped[:10000].tolist()},
            "complete": True}
    _write_json_atomic(os.path.join(out, META_NAME), meta)
    return meta


# ---- main ------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgvq cache-codes",
        description="Tokenize an image dataset into HF `datasets` Parquet shards of MGVQ sub-token indices "
                    "(stage-one cache for generator training). Resumable; runs under accelerate / torchrun.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  mgvq cache-codes --tokenizer runs/tok/final --data fashion-mnist --split train --out shards/fm\n"
               "  accelerate launch --num_processes 8 -m tokenizer.cache_codes --tokenizer runs/tok/final \\\n"
               "      --data /data/imagenet/train --out shards/in1k-256 --views ten-crop --batch-size 64\n"
               "A killed run resumes when started again with the same arguments.")
    p.add_argument("--tokenizer", required=True, help="MGVQTokenizer.save_pretrained folder")
    p.add_argument("--data", required=True, help="'fashion-mnist', an ImageNet-layout folder (root/<class>/<img>), "
                                                 "a datasets save_to_disk dir, or Parquet file(s) / a folder of them")
    p.add_argument("--data-path", help="folder with the Fashion-MNIST IDX files for --data fashion-mnist (default: "
                                       "/usr/share/datasets/fashion-mnist, then the cache, then a download)")
    p.add_argument("--split", default="train", help="split for fashion-mnist / DatasetDicts / split sub-folders")
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
    return p


def main(argv: list[str] | None = None) -> int:
    run(_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> dict:
    """The whole extraction for this rank; returns its stats (images, seconds in the encode loop, shards, skipped)."""
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.num_workers < 0:
        raise SystemExit(f"--num-workers={args.num_workers}: must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit={args.limit}: must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        raise SystemExit(f"--image-size={args.image_size}: must be >= 1")
    check_output_dir(args.out, what="--out")  # before any loading: an unwritable --out fails now, not after hours

    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from tqdm import tqdm

    from tokenizer.model import MGVQTokenizer

    # launched distributed on CPU: gloo (accelerate has no CPU default); single process: no process group at all
    # (accelerate 1.15 tries to use one when given the kwargs). Ranks never wait on each other; the timeout is loose.
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers = [InitProcessGroupKwargs(backend=None if torch.cuda.is_available() else "gloo",
                                           timeout=timedelta(hours=6))]
    acc = Accelerator(kwargs_handlers=handlers)
    rank, world = acc.process_index, acc.num_processes

    weights = os.path.join(args.tokenizer, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r}: no model.safetensors (expected a "
                                "MGVQTokenizer.save_pretrained folder)")
    tok_sha = sha256_file(weights)
    tok = MGVQTokenizer.from_pretrained(args.tokenizer, device=acc.device).eval()
    cfg = tok.config
    args.image_size = args.image_size or cfg.image_size
    f = cfg.downsample
    if args.image_size % f:
        raise SystemExit(f"--image-size={args.image_size}: must be a multiple of the tokenizer's downsample {f}")
    grid = (args.image_size // f, args.image_size // f)
    if args.precision == "bf16" and acc.device.type != "cuda":
        raise SystemExit("--precision bf16 needs a CUDA device; use fp32 on CPU")

    source, source_desc = open_source(args.data, args.split, args.label_column, args.data_path)
    fixed = _fixed_meta(args, tok, tok_sha, source, source_desc, grid)
    out = args.out
    n_bytes = fixed["source"]["num_images"] * fixed["views"]["count"] * grid[0] * grid[1] * cfg.groups
    check_output_dir(out, need_bytes=n_bytes * np.dtype(fixed["dtype"]).itemsize, what="--out")  # uncompressed codes
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    check_existing_meta(out, fixed)
    if not os.path.isfile(os.path.join(out, META_NAME)):  # every rank may write it: the content is identical
        _write_json_atomic(os.path.join(out, META_NAME), {**fixed, "complete": False})
    n, S, n_shards, V = fixed["source"]["num_images"], args.shard_size, fixed["num_shards"], fixed["views"]["count"]
    mine = [k for k in range(rank, n_shards, world)]
    for k in mine:  # partial files of a killed run (only this rank writes these shards, so none is in use)
        for stale in glob.glob(os.path.join(out, "data", f".tmp-*-{os.path.basename(shard_name(k, n_shards))}")):
            os.remove(stale)
    todo = [k for k in mine if not os.path.isfile(os.path.join(out, shard_name(k, n_shards)))]
    batches = [list(range(s, min(s + args.batch_size, (k + 1) * S, n)))
               for k in todo for s in range(k * S, min((k + 1) * S, n), args.batch_size)]
    features = shard_features(V, grid, cfg.groups, fixed["dtype"], source.class_names)
    np_dtype = np.dtype(fixed["dtype"])
    loader = DataLoader(_ViewsDataset(source, args.image_size, args.views), batch_sampler=batches,
                        num_workers=args.num_workers, collate_fn=_collate, pin_memory=acc.device.type == "cuda",
                        persistent_workers=False)
    kill_after = int(os.environ.get(_STOP_ENV, "0") or 0)
    todo_images = sum(len(b) for b in batches)
    if acc.is_main_process:
        print(f"cache-codes: {n} images -> {n_shards} shards of {S} in {out!r}; rank {rank}/{world}: "
              f"{len(todo)}/{len(mine)} shards to write ({len(mine) - len(todo)} already done); V={V}, "
              f"G={cfg.groups}, K={cfg.codebook_size}, grid={grid}, codes {fixed['dtype']}", file=sys.stderr)
    bar = tqdm(total=todo_images, unit="img", disable=not acc.is_local_main_process, smoothing=0.05,
               desc=f"rank {rank} encoding", dynamic_ncols=True)
    acc_codes, acc_labels, acc_index, acc_bad = [], [], [], 0
    cur, remaining, n_written = None, 0, 0
    torch_dtype = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}[fixed["dtype"]]
    # Shards are written by one background thread (pyarrow releases the GIL) while the next shard is encoded; at
    # most one write is pending. Codes stay on the device until their shard is complete: no sync per batch.
    writer, pending = ThreadPoolExecutor(max_workers=1), None

    def drain():
        nonlocal pending, n_written
        if pending is not None:
            pending.result()  # re-raises a failed write
            pending, n_written = None, n_written + 1
            if kill_after and n_written >= kill_after:  # test hook: die like a preempted job
                os.kill(os.getpid(), signal.SIGKILL)

    t0, t_first = time.perf_counter(), None
    for views, labels, index, bad in loader:
        t_first = t_first or time.perf_counter()  # worker start-up + first batch (pipeline fill)
        nb = len(index) + len(bad)
        k = (int(index[0]) if len(index) else bad[0][0]) // S
        if cur is None:
            cur, remaining = k, min((k + 1) * S, n) - k * S
        assert k == cur, f"batch of shard {k} while shard {cur} is open"
        if views is not None:
            x = to_model_input(views.to(acc.device, non_blocking=True).flatten(0, 1))
            with torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext():
                idx = tok.encode(x)
            acc_codes.append(idx.view(len(index), V, *idx.shape[1:]).to(torch_dtype))
            acc_labels.append(labels.numpy())
            acc_index.append(index.numpy())
        for i, why in bad:
            tqdm.write(f"rank {rank}: skipping unreadable image {i}: {why}", file=sys.stderr)
        acc_bad += len(bad)
        remaining -= nb
        bar.update(nb)
        if remaining == 0:
            codes = torch.cat(acc_codes).cpu().numpy() if acc_codes else np.zeros((0, V, *grid, cfg.groups), np_dtype)
            drain()
            pending = writer.submit(write_shard, os.path.join(out, shard_name(cur, n_shards)), codes,
                                    np.concatenate(acc_labels) if acc_labels else np.zeros(0, np.int64),
                                    np.concatenate(acc_index) if acc_index else np.zeros(0, np.int64), features)
            acc_codes, acc_labels, acc_index, cur = [], [], [], None
    drain()
    writer.shutdown()
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    print(f"cache-codes: rank {rank}/{world} wrote shards {[k for k in todo]} ({acc_bad} unreadable images skipped)",
          file=sys.stderr)
    meta = finalize(out, fixed)  # the last rank to finish sees every shard and writes the final meta.json
    if meta is not None:
        c = meta["counts"]
        print(f"cache-codes: complete: {c['written']} images written, {c['skipped']} skipped as unreadable "
              f"({n_shards} shards in {out!r})", file=sys.stderr)
    return {"images": todo_images, "seconds": seconds, "fill_seconds": (t_first or t0) - t0, "shards": n_written,
            "skipped": acc_bad,
            "complete": meta is not None}


if __name__ == "__main__":
    sys.exit(main())
