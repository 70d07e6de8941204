"""gFID evaluation: sample N class-balanced images, write PNGs + an ADM npz, compute FID / IS / precision / recall.

    npz = generate_samples(pipe.sample_fn(guidance_scale=2.0), "runs/eval", num_images=50000, num_classes=1000,
                           batch_size=32, resize_to=256)                   # every process its shard, then the npz
    metrics = evaluate_samples(npz, "VIRTUAL_imagenet256_labeled.npz", InceptionFeatures("auto"))

The command line is `mgvq evaluate-generation` (pipelines/evaluate_generation.py: it loads the pipeline and passes
its `sample_fn`; this module never imports the pipelines or the stages).

Protocol (MGVQ's sample_c2i_ddp.py / LlamaGen's, see evaluation/__init__.py for comparability):
- image i has label i % num_classes (class-balanced like MGVQ's `arange(C).repeat(N/C)`) and seed base_seed + i;
- images are made in fixed batches [c*B, (c+1)*B) and batch c goes to process c % world_size. A batch's content never
  depends on the number of processes or on earlier interruptions, so any shard can be redone and a batch-seeded
  sampler (one torch.Generator per batch, seeded with its first image's seed) is reproducible too; `--pipeline`
  sampling uses one generator per image (seed + i), so its images do not depend on --batch-size either;
- one PNG per image, `images/{i:06d}.png`, written atomically (tmp + rename); finished batches are skipped on rerun;
- optional resize (e.g. 384 -> 256) with bicubic interpolation on the float tensor (LlamaGen), then clamp and uint8;
- when every image exists, the main process writes `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels) for ADM's
  evaluator, then FID / IS (10 splits) / precision / recall (k=3) -> `metrics.json` and a printed table.

Feature networks: `evaluate_samples` scores with any `FeatureNet`: Inception (`metrics.InceptionFeatures`: FID, sFID,
IS) or a classifier of the generator's own classes (kind "classifier", e.g. the demo's Fashion-MNIST CNN, wrapped by
pipelines.classifier.ClassifierFeatures): the Frechet distance in its feature space ("fd"), an Inception-Score-like
number from its class probabilities ("classifier_score"), conditional accuracy (the fraction of samples it assigns
to their conditioning label) and k-NN precision / recall on its features. "fd" is reported for both kinds.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from evaluation import metrics as M

# sample_fn(labels (B,) int64, seeds list[int]) -> float (B, 3, H, W) in [0, 1]
SampleFn = Callable[[torch.Tensor, list], torch.Tensor]
CONFIG_NAME = "sampling_config.json"


class FeatureNet(Protocol):
    """What `evaluate_samples` scores with. `metrics.InceptionFeatures` is one (kind "inception", the default when
    the attribute is missing); a classifier of the generator's classes is another (kind "classifier": its logits
    index the same labels as the samples, so conditional accuracy is defined; it has no spatial features)."""

    weights_path: Path  # the weights file: part of the reference-feature cache key
    device: torch.device

    def __call__(self, batches, spatial: bool = False) -> tuple:
        """uint8 (B, 3, H, W) batches -> (features (N, D), logits (N, classes)) float64, and with `spatial=True` a
        third item: sFID spatial features (N, D_s) or None when the net has none."""
        ...


def feature_net_kind(net) -> str:
    return getattr(net, "kind", "inception")


def feature_net_name(net) -> str:
    return getattr(net, "name", "inception-v3-compat")


def image_path(image_dir, i: int) -> Path:
    return Path(image_dir) / f"{i:06d}.png"


def batches_for_rank(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """Fixed batches [c*B, (c+1)*B) of image indices; batch c belongs to rank c % world_size."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images={num_images} and batch_size={batch_size} must both be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    chunks = [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]
    return chunks[rank::world_size]


def _write_png(path: Path, hwc: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(hwc).save(tmp, format="PNG")
    os.replace(tmp, path)


def sample_to_folder(sample_fn: SampleFn, image_dir, num_images: int, num_classes: int, batch_size: int,
                     seed: int = 0, resize_to: int | None = None, rank: int = 0, world_size: int = 1,
                     progress: bool = True, timing: dict | None = None) -> int:
    """This rank's share of the images as PNGs in `image_dir`; finished batches are skipped. Returns images written.
    `timing` (a dict) accumulates "images" and "seconds" spent inside `sample_fn` (the sampler's own speed: no PNG
    writing, no resizing)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    mine = batches_for_rank(num_images, batch_size, rank, world_size)
    todo = [c for c in mine if not all(image_path(image_dir, i).exists() for i in c)]
    written, t0 = 0, time.time()
    for n, chunk in enumerate(todo):
        labels = torch.tensor([i % num_classes for i in chunk], dtype=torch.long)
        seeds = [seed + i for i in chunk]
        t_call = time.perf_counter()
        x = sample_fn(labels, seeds)
        if timing is not None:
            timing["images"] = timing.get("images", 0) + len(chunk)
            timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - t_call
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] != len(chunk) or x.shape[1] != 3:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"sample_fn must return a float tensor (B={len(chunk)}, 3, H, W) in [0, 1], got {got}")
        if not torch.isfinite(x).all():
            raise ValueError(f"sample_fn returned non-finite values for images {chunk.start}..{chunk.stop - 1}")
        x = x.float().cpu()
        if resize_to is not None and tuple(x.shape[-2:]) != (resize_to, resize_to):
            x = F.interpolate(x, size=(resize_to, resize_to), mode="bicubic", align_corners=False)
        for i, hwc in zip(chunk, M.nchw_to_nhwc(M.to_uint8(x))):
            p = image_path(image_dir, i)
            if not p.exists():
                _write_png(p, hwc)
                written += 1
        if progress and (n + 1) % max(1, len(todo) // 20) == 0:
            rate = (n + 1) / (time.time() - t0)
            print(f"[rank {rank}] {n + 1}/{len(todo)} batches ({rate * batch_size:.2f} img/s)", flush=True)
    return written


def folder_to_npz(image_dir, num_images: int, num_classes: int, npz_path) -> np.ndarray:
    """Stack images 0..N-1 into an ADM npz (`arr_0` uint8 NHWC, `arr_1` labels); every PNG must exist."""
    from PIL import Image

    missing = [i for i in range(num_images) if not image_path(image_dir, i).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_images} images missing in {image_dir} (first: "
                                f"{image_path(image_dir, missing[0]).name}); rerun the same command to fill them")
    first = np.asarray(Image.open(image_path(image_dir, 0)).convert("RGB"))
    images = np.empty((num_images, *first.shape), dtype=np.uint8)
    for i in range(num_images):
        a = np.asarray(Image.open(image_path(image_dir, i)).convert("RGB"))
        if a.shape != first.shape:
            raise ValueError(f"{image_path(image_dir, i)} is {a.shape}, image 0 is {first.shape}: "
                             f"mixed runs in one folder?")
        images[i] = a
    M.save_npz(npz_path, images, labels=np.arange(num_images) % num_classes)
    return images


class Dist:
    """rank / world size / barrier from accelerate (gloo on CPU); a single process when not launched distributed."""

    def __init__(self):
        self.rank, self.world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState(**({} if torch.cuda.is_available() else {"backend": "gloo"}))
            self.rank, self.world_size = state.process_index, state.num_processes
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if self.world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(f"WORLD_SIZE={self.world_size} but no torch.distributed process group was initialised")

    def barrier(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def generate_samples(sample_fn: SampleFn, out_dir, num_images: int, num_classes: int, batch_size: int,
                     seed: int = 0, resize_to: int | None = None, config: dict | None = None,
                     dist: Dist | None = None, progress: bool = True, timing: dict | None = None) -> Path:
    """All processes sample their shard into out_dir/images; the main one then writes out_dir/samples.npz.

    `config` (sampling settings) is stored in out_dir/sampling_config.json on the first run and a rerun with other
    settings into the same folder is refused, so a resumed folder never mixes two runs. `timing`: see
    `sample_to_folder` (this process's share)."""
    dist = dist or Dist()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"num_classes": num_classes, "batch_size": batch_size, "seed": seed, "resize_to": resize_to,
                **(config or {})}
    cfg_path = out_dir / CONFIG_NAME
    if dist.rank == 0 and not cfg_path.exists():
        cfg_path.write_text(json.dumps(settings, indent=2, sort_keys=True))
    dist.barrier()
    old = json.loads(cfg_path.read_text())
    diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
    if diff:
        raise ValueError(f"{out_dir} holds samples made with other settings {{name: (stored, now)}} = {diff}; "
                         f"use another --out or the same settings")
    sample_to_folder(sample_fn, out_dir / "images", num_images, num_classes, batch_size, seed, resize_to,
                     dist.rank, dist.world_size, progress, timing)
    dist.barrier()
    npz = out_dir / "samples.npz"
    if dist.rank == 0:
        folder_to_npz(out_dir / "images", num_images, num_classes, npz)
    dist.barrier()
    return npz


# ------------------------------------------------------------------------------------------------ evaluation


def reference_features(ref, inception: FeatureNet, size: int | None = None, cache_dir=None,
                       batch_size: int = 100, spatial: bool = False):
    """(mu, sigma, pool features or None) of a reference: an ADM npz (mu/sigma used as stored, like ADM; `arr_0`
    images, if present, give the features for precision/recall) or an image folder (resized to cover `size` and
    centre-cropped when given). Features are cached in cache_dir, keyed by the reference file and the weights.
    `spatial=True` appends the sFID statistics (mu_s, sigma_s): the npz's own, else from the reference images'
    spatial features; None when the reference has neither."""
    ref = Path(ref)
    if not ref.exists():
        raise FileNotFoundError(f"reference {ref} does not exist (expected an ADM .npz or an image folder)")
    key = f"{ref.resolve()}|{ref.stat().st_mtime_ns}|{size}|{inception.weights_path.resolve()}"
    cache = Path(cache_dir) / f"ref_features_{ref.stem}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz" \
        if cache_dir else None
    # an ADM npz's stored mu / sigma are Inception statistics: another feature net computes its own from the images
    inception_net = feature_net_kind(inception) == "inception"
    stats = M.load_npz_stats(ref) if ref.suffix == ".npz" and inception_net else None
    stats_s = M.load_npz_stats(ref, spatial=True) if spatial and ref.suffix == ".npz" and inception_net else None
    pool = feats_s = None
    cached = dict(np.load(cache)) if cache is not None and cache.exists() else {}
    if "pool" in cached and (not spatial or stats_s is not None or "spatial" in cached):
        pool, feats_s = cached["pool"], cached.get("spatial")
    else:
        if ref.suffix == ".npz":
            with np.load(ref) as f:
                has_images = "arr_0" in f
            images = M.load_npz_images(ref) if has_images else None
        else:
            images = M.ImageFolder(ref, size=(size, size) if size else None)
        if images is not None:
            pool, _, feats_s = inception(M.iter_batches(images, batch_size), spatial=True)
            if cache is not None:
                np.savez(cache, pool=pool, **({} if feats_s is None else {"spatial": feats_s}))
    if stats is None:
        if pool is None:
            raise ValueError(f"reference {ref} has neither mu/sigma nor arr_0 images")
        stats = M.feature_statistics(pool)
    if not spatial:
        return stats[0], stats[1], pool
    if stats_s is None and feats_s is not None:
        stats_s = M.feature_statistics(feats_s)
    return stats[0], stats[1], pool, stats_s


def sample_labels(path) -> np.ndarray | None:
    """`arr_1` (the conditioning labels) of a sample npz, or None when it has none."""
    with np.load(path) as f:
        return f["arr_1"].astype(np.int64) if "arr_1" in f else None


def evaluate_samples(images, ref, inception: FeatureNet, splits: int = 10, cache_dir=None,
                     batch_size: int = 100, labels=None) -> dict:
    """Metrics of uint8 NHWC `images` (or a sample npz) against `ref` with the feature net `inception`.

    Inception (the default kind): FID (= "fd"), sFID (ADM's spatial features; None if `ref` has no mu_s/sigma_s and
    no images), IS (mean, std over `splits`), precision and recall (k=3).
    A classifier of the generator's classes (kind "classifier"): "fd" (Frechet distance in its feature space),
    "classifier_score" (the IS formula on its class probabilities), precision / recall (k=3) on its features and
    "accuracy", the fraction of samples classified as their label (`labels`, else the npz's `arr_1`)."""
    if isinstance(images, (str, Path)):
        labels = sample_labels(images) if labels is None else labels
        images = M.load_npz_images(images)
    images = np.asarray(images)
    n = len(images)
    kind = feature_net_kind(inception)
    if kind not in ("inception", "classifier"):
        raise ValueError(f"feature net kind {kind!r}: valid 'inception', 'classifier'")
    pool, logits, feats_s = inception(M.iter_batches(images, batch_size), spatial=True)
    ref_mu, ref_sigma, ref_pool, ref_s = reference_features(ref, inception, size=images.shape[1], cache_dir=cache_dir,
                                                            batch_size=batch_size, spatial=True)
    score, score_std = M.inception_score(logits=logits, splits=min(splits, n))
    fd = M.frechet_distance_to_features(pool, ref_mu, ref_sigma)
    out = {"num_images": n, "feature_net": feature_net_name(inception), "fd": fd}
    if kind == "inception":
        out.update(fid=fd, sfid=None if ref_s is None or feats_s is None else
                   M.frechet_distance_to_features(feats_s, *ref_s),
                   inception_score=score, inception_score_std=score_std, is_splits=min(splits, n))
    else:
        out.update(classifier_score=score, classifier_score_std=score_std, score_splits=min(splits, n),
                   accuracy=None)
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (n,):
                raise ValueError(f"evaluate_samples: labels must be ({n},), got {labels.shape}")
            out["accuracy"] = float((np.asarray(logits).argmax(1) == labels).mean())
    out["precision"] = out["recall"] = None
    if ref_pool is not None and len(ref_pool) > 3 and n > 3:
        out["precision"], out["recall"] = M.precision_recall(ref_pool, pool, k=3, device=inception.device)
    out["num_ref_images"] = None if ref_pool is None else len(ref_pool)
    return out


def format_table(rows: dict) -> str:
    width = max(len(k) for k in rows)
    lines = []
    for k, v in rows.items():
        v = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("the evaluate-generation command moved to the pipelines (evaluation/ is a library): run "
             "`mgvq evaluate-generation ...` or `python -m pipelines.evaluate_generation ...` (same flags)")
