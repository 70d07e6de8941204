"""Image-generation and reconstruction metrics, written against arrays so that they can be checked by hand.

Everything here takes numpy arrays / torch tensors (images, features, logits); nothing imports the tokenizer,
the generator or the pipeline.

Conventions
- Images "uint8 NHWC" are what the ADM evaluator stores in `arr_0`; "uint8 NCHW" is what the Inception extractor eats.
- Fréchet distance, IS, sFID and precision/recall follow OpenAI's ADM evaluator
  (guided-diffusion/evaluations/evaluator.py), which LlamaGen and MGVQ use for their published gFID. Features come
  from torch-fidelity's `inception-v3-compat`, the PyTorch port of the same TF Inception graph (pool_3 = "2048",
  un-biased logits = "logits_unbiased"; sFID: the first 7 channels of mixed_6/conv = Mixed_6d.branch1x1, 2023-dim).
- Inception weights: `resolve_inception_weights` (a given file; or "auto": the torch.hub cache, else a download,
  else an error naming what failed, the URL and the destination).
- PSNR exists in two conventions and both are reported by the evaluation scripts:
    psnr_mean_of_images: mean over images of per-image PSNR (LlamaGen, skimage per image)
    psnr_of_mean_mse:    PSNR of the dataset-mean MSE (MGVQ's eval_recon.py), always <= the former (Jensen).
- SSIM is skimage's `structural_similarity` on uint8 HWC with channel_axis=-1, so data_range = 255 (the uint8 range),
  as MGVQ computes it. (LlamaGen used data_range=2.0 on [0, 1] floats, which inflates SSIM; not reproduced here.)
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy import linalg

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance, feature statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64, sigma with the unbiased (N-1) normalisation like ADM."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics: features must be (N>=2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as in ADM's evaluator.

    Singular covariances (a feature that never varies, fewer samples than dimensions) are handled as in ADM /
    torch-fidelity, without scipy's LinAlgWarning ("Matrix is singular ...") reaching the caller: ADM passes
    disp=False, which silences it, and scipy's root of a singular product of covariances is accurate. Only if the root
    is not finite, or scipy flagged the product and the root does not square back to it (relative residual > 1e-6),
    is eps * I added to both covariances and the root taken again (with a warning, as ADM does). A complex result whose
    diagonal has an imaginary part above 1e-3 is an error, otherwise the real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mu shapes differ: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"frechet_distance: sigma shapes {sigma1.shape}, {sigma2.shape} do not match mu {mu1.shape}")
    diff = mu1 - mu2

    def sqrtm(a):  # scipy's root, and whether scipy flagged `a` (singular / ill-conditioned LinAlgWarning, not shown)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            root = linalg.sqrtm(a)
        flagged = False
        for w in caught:
            if issubclass(w.category, linalg.LinAlgWarning):
                flagged = True
            else:  # any other warning is passed on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return root, flagged

    product = sigma1.dot(sigma2)
    covmean, flagged = sqrtm(product)
    failed = not np.isfinite(covmean).all()
    if flagged and not failed:
        scale = np.linalg.norm(product)
        failed = np.linalg.norm(covmean.dot(covmean) - product) > 1e-6 * (scale if scale > 0 else 1.0)
    if failed:
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, _ = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_to_features(features, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussian fitted to `features` (N, D) and (mu2, sigma2).

    Equals `frechet_distance(*feature_statistics(features), mu2, sigma2)`. For N > D that is exactly what runs (ADM).
    For N <= D the sample covariance S1 = A^T A (A = centred features / sqrt(N-1)) has rank < N, and the trace term
    is computed exactly in N dimensions: Tr((S1 S2)^1/2) = sum sqrt(eig(A S2 A^T)). This avoids a D x D sqrtm of a
    singular product (minutes on a CPU for D = 2048) in small runs (smoke tests, few-image rFID)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"frechet_distance_to_features: features must be (N>=2, D), got shape {f.shape}")
    n, d = f.shape
    if n > d:
        return frechet_distance(*feature_statistics(f), mu2, sigma2)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance_to_features: features have D={d}, "
                         f"reference mu {mu2.shape} sigma {sigma2.shape}")
    mu1 = f.mean(axis=0)
    a = (f - mu1) / np.sqrt(n - 1)
    ev = np.linalg.eigvalsh(a @ sigma2 @ a.T)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.sum(a * a) + np.trace(sigma2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Inception score


def inception_score(logits=None, probs=None, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, returned as (mean, std) over `splits` contiguous splits.

    Pass Inception's un-biased logits (torch-fidelity "logits_unbiased", ADM's softmax input) or probabilities.
    Splits are `[i*N//splits, (i+1)*N//splits)` like torch-fidelity; ADM uses splits of 5000, the same thing for
    N = 50,000. No shuffling (ADM does not shuffle; torch-fidelity does by default).
    """
    if (logits is None) == (probs is None):
        raise ValueError("inception_score: pass exactly one of logits= or probs=")
    if logits is not None:
        x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
        log_p = x.log_softmax(dim=1)
    else:
        p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
        if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=torch.float64), atol=1e-4):
            raise ValueError("inception_score: probs must be non-negative rows summing to 1")
        log_p = p.clamp_min(1e-300).log()
    if log_p.dim() != 2:
        raise ValueError(f"inception_score: expected (N, classes), got shape {tuple(log_p.shape)}")
    n = log_p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits={splits} must be in [1, N={n}]")
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits: (i + 1) * n // splits]
        pc = p[i * n // splits: (i + 1) * n // splits]
        log_q = pc.mean(dim=0, keepdim=True).log()
        kl = (pc * (lp - log_q)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall (Kynkäänniemi et al. 2019, ADM's ManifoldEstimator with k=3)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features, k: int = 3, batch_size: int = 10000, device="cpu") -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour (the point itself excluded)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    if f.shape[0] <= k:
        raise ValueError(f"manifold_radii: need more than k={k} points, got {f.shape[0]}")
    radii = torch.empty(f.shape[0], dtype=torch.float32, device=device)
    for s in range(0, f.shape[0], batch_size):
        # kthvalue index k+1 counts the zero self-distance: ADM takes column k of the partitioned distances.
        radii[s:s + batch_size] = _sq_dists(f[s:s + batch_size], f).kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(ref_features, sample_features, k: int = 3, batch_size: int = 10000, device="cpu"):
    """(precision, recall): the fraction of samples inside the reference manifold, and of references inside the
    sample manifold; a point is inside when it lies within the k-NN radius of at least one point of the other set."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    r_ref, r_smp = manifold_radii(ref, k, batch_size, device), manifold_radii(smp, k, batch_size, device)
    smp_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=device)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)
    for s in range(0, ref.shape[0], batch_size):
        for t in range(0, smp.shape[0], batch_size):
            d = _sq_dists(ref[s:s + batch_size], smp[t:t + batch_size])
            smp_in[t:t + batch_size] |= (d <= r_ref[s:s + batch_size, None]).any(0)
            ref_in[s:s + batch_size] |= (d <= r_smp[None, t:t + batch_size]).any(1)
    return float(smp_in.double().mean()), float(ref_in.double().mean())


# ----------------------------------------------------------------------------------------------------------------
# PSNR / SSIM


def _as_float01(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def per_image_mse(x, y) -> np.ndarray:
    """Per-image MSE on [0, 1] images (uint8 inputs are divided by 255); any layout with the batch first."""
    x, y = _as_float01(x), _as_float01(y)
    if x.shape != y.shape:
        raise ValueError(f"per_image_mse: shapes differ: {x.shape} vs {y.shape}")
    return ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)


def psnr_from_mse(mse) -> np.ndarray:
    """PSNR in dB for [0, 1] images (data_range 1); mse 0 gives inf."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def psnr_mean_of_images(x, y) -> float:
    """Mean over images of per-image PSNR (LlamaGen's convention)."""
    return float(psnr_from_mse(per_image_mse(x, y)).mean())


def psnr_of_mean_mse(x, y) -> float:
    """PSNR of the dataset-mean MSE, 20 log10(1 / sqrt(mean MSE)) (MGVQ's eval_recon.py convention)."""
    return float(psnr_from_mse(per_image_mse(x, y).mean()))


def ssim_per_image(x_uint8_nhwc, y_uint8_nhwc) -> np.ndarray:
    """skimage SSIM per image on uint8 HWC with channel_axis=-1 (data_range 255, inferred from uint8)."""
    from skimage.metrics import structural_similarity

    x, y = np.asarray(x_uint8_nhwc), np.asarray(y_uint8_nhwc)
    if x.dtype != np.uint8 or y.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape != y.shape:
        raise ValueError(f"ssim_per_image: need two uint8 (N, H, W, 3) arrays, "
                         f"got {x.dtype}{x.shape}, {y.dtype}{y.shape}")
    return np.array([structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(x, y)])


# ----------------------------------------------------------------------------------------------------------------
# Image conversions and I/O


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), clamped, round-half-up."""
    return (x.float() * 255 + 0.5).clamp_(0, 255).to(torch.uint8)


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def save_npz(path, images_uint8_nhwc: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write an ADM-evaluator sample batch: `arr_0` uint8 (N, H, W, 3), + `arr_1` int64 labels as ADM's samplers do."""
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"save_npz: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_npz_images(path) -> np.ndarray:
    """`arr_0` of an ADM npz (samples or reference batch), checked to be uint8 (N, H, W, 3)."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise KeyError(f"{path}: no 'arr_0' (keys: {list(f.keys())}); not an ADM sample/reference npz")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def load_npz_stats(path, spatial: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) stored in an ADM reference npz (e.g. VIRTUAL_imagenet256_labeled.npz), or None if absent.
    `spatial=True`: the sFID statistics (mu_s, sigma_s, 2023-dim) instead."""
    keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    with np.load(path) as f:
        if keys[0] in f and keys[1] in f:
            return f[keys[0]].astype(np.float64), f[keys[1]].astype(np.float64)
    return None


def save_npz_stats(path, mu: np.ndarray, sigma: np.ndarray, mu_s: np.ndarray | None = None,
                   sigma_s: np.ndarray | None = None) -> None:
    """Reference statistics in the ADM layout (`mu`, `sigma`, and the sFID `mu_s`, `sigma_s` when given), readable
    by `load_npz_stats` and ADM's evaluator."""
    arrays = {"mu": np.asarray(mu), "sigma": np.asarray(sigma)}
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("save_npz_stats: pass both mu_s and sigma_s (sFID statistics) or neither")
    if mu_s is not None:
        arrays.update(mu_s=np.asarray(mu_s), sigma_s=np.asarray(sigma_s))
    np.savez(path, **arrays)


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no images with extensions {IMAGE_EXTENSIONS}")
    return files


def resize_cover_crop(img, size: tuple[int, int]):
    """PIL image -> RGB PIL image of (width, height) = size: bicubic resize so it covers the target, centre crop."""
    from PIL import Image

    w, h = size
    img = img.convert("RGB")
    scale = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


class ImageFolder:
    """Sorted images of a folder as uint8 (H, W, 3) arrays; if `size` (w, h) is given: resize to cover, centre crop."""

    def __init__(self, folder, size: tuple[int, int] | None = None, max_images: int | None = None):
        self.files = list_images(folder)[:max_images]
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img = resize_cover_crop(img, self.size) if self.size else img.convert("RGB")
            return np.asarray(img)


def iter_batches(images: Sequence, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 HWC images (an (N, H, W, 3) array or any sequence of HWC arrays) -> uint8 NCHW tensor batches."""
    for s in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(images[i]) for i in range(s, min(s + batch_size, len(images)))])
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"iter_batches: images must be uint8 HWC RGB, got {batch.dtype} {batch.shape[1:]}")
        yield torch.from_numpy(batch).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Inception features (torch-fidelity inception-v3-compat)


def default_inception_weights_path() -> Path:
    """Where `auto` looks for (and downloads to) the Inception weights: $TORCH_HOME/hub/checkpoints/ (torch.hub's
    cache, the same place torch-fidelity uses, so a file fetched by either is found by both)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def _fetch_instructions() -> str:
    return (f"Fetch {INCEPTION_WEIGHTS_URL} (torch-fidelity's FID Inception, the TF 2015-12-05 graph ported to "
            f"PyTorch, ~95 MB) on a machine that can reach it and put it at {default_inception_weights_path()} "
            f"(found there automatically; $TORCH_HOME moves it), or pass its path with --inception-weights PATH "
            f"(weights_path= in Python).")


def _describe_download_error(e: BaseException) -> str:
    """The reason a download failed, in words: name resolution, HTTP status, refused connection, unwritable cache."""
    import socket
    import urllib.error

    reason = getattr(e, "reason", None)
    if isinstance(e, urllib.error.HTTPError):
        return f"the server answered HTTP {e.code} {e.reason}"
    if isinstance(reason, socket.gaierror) or isinstance(e, socket.gaierror):
        host = INCEPTION_WEIGHTS_URL.split("/")[2]
        return f"the host name {host} could not be resolved ({reason or e}; a DNS failure)"
    if isinstance(reason, (ConnectionError, TimeoutError, socket.timeout)):
        return f"the connection failed ({type(reason).__name__}: {reason})"
    if isinstance(e, OSError) and not isinstance(e, urllib.error.URLError):
        return f"{type(e).__name__}: {e}"
    return f"{type(e).__name__}: {reason or e}"


def _download_file(url: str, dst: Path) -> None:
    """url -> dst through a temporary file in the same folder (a torn download is never picked up)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_inception_weights(weights_path=None, download: bool = True) -> Path:
    """The Inception weights file to use.

    `weights_path` a path: that file, which must exist. None or "auto": the cached file
    ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth) if present, else downloaded there from
    torch-fidelity's release when `download` (i.e. when this machine can reach it). When no file can be had, the
    FileNotFoundError says what failed (missing path, unresolvable host, HTTP status, ...), which URL to fetch and
    where to put it."""
    if weights_path is not None and str(weights_path) != "auto":
        path = Path(weights_path)
        if path.is_file():
            return path
        raise FileNotFoundError(f"Inception weights file {path} does not exist. {_fetch_instructions()}")
    path = default_inception_weights_path()
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(f"Inception weights {INCEPTION_WEIGHTS_NAME} are not at {path} and downloading is "
                                f"switched off. {_fetch_instructions()}")
    try:
        _download_file(INCEPTION_WEIGHTS_URL, path)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable message
        raise FileNotFoundError(f"Inception weights {INCEPTION_WEIGHTS_NAME} are not at {path}, and downloading "
                                f"{INCEPTION_WEIGHTS_URL} failed: {_describe_download_error(e)}. "
                                f"{_fetch_instructions()}") from e
    return path


def _build_inception_architecture(features_list):
    """torch-fidelity's inception-v3-compat module without loading any weights (no download)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe_mod

    with mock.patch.object(fe_mod, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe_mod.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        return fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", list(features_list))


def save_random_inception_weights(path, seed: int = 0) -> Path:
    """Random (kaiming re-initialised) weights in the real file format: exercises the full code path offline.
    Numbers computed with them are NOT FID/IS; they only test the machinery."""
    torch.manual_seed(seed)
    model = _build_inception_architecture(["2048"])
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return Path(path)


# ADM's sFID features: the first 7 channels of TF Inception's `mixed_6/conv:0` (17 x 17 x 192, after batch norm and
# ReLU), flattened in TF's (h, w, c) order -> 17 * 17 * 7 = 2023 values per image. In torch-fidelity's port that
# tensor is the output of `Mixed_6d.branch1x1` (its TF->PyTorch weight map: mixed_6/conv -> Mixed_6d.branch1x1).
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


class InceptionFeatures:
    """pool_3 (2048) features, un-biased logits (1008) and ADM's spatial sFID features (2023) of torch-fidelity's
    `inception-v3-compat`.

    `weights_path`: a weights file, or None / "auto" (see `resolve_inception_weights`: the cached file, else a
    download when `download` and this machine can reach it, else a FileNotFoundError that says what failed and
    which file to put where). The file is read with `torch.load(weights_only=True)` into the architecture built
    without any download.
    Call with uint8 (N, 3, H, W) batches (any H, W; resized to 299 inside, like the TF graph).
    """

    def __init__(self, weights_path=None, device="cpu", batch_size: int = 50, download: bool = True):
        path = resolve_inception_weights(weights_path, download=download)
        model = _build_inception_architecture(["2048", "logits_unbiased"])
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} is not torch-fidelity's {INCEPTION_WEIGHTS_NAME} state dict: {e}") from None
        self.model = model.to(device).eval()
        self.device, self.batch_size, self.weights_path = torch.device(device), batch_size, path
        self._spatial = None
        self.model.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    @torch.no_grad()
    def __call__(self, batches: Iterable[torch.Tensor] | torch.Tensor, spatial: bool = False):
        """uint8 NCHW tensor or iterable of such batches -> (pool (N, 2048), logits (N, 1008)) float64, and with
        `spatial=True` also ADM's sFID features (N, 2023) as a third array."""
        if torch.is_tensor(batches):
            batches = batches.split(self.batch_size)
        pools, logits, spatials = [], [], []
        for x in batches:
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"InceptionFeatures: need uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            for xb in x.split(self.batch_size):
                p, l = self.model(xb.to(self.device))
                pools.append(p.double().cpu().numpy())
                logits.append(l.double().cpu().numpy())
                if spatial:
                    spatials.append(self._spatial.double().cpu().numpy())
                self._spatial = None
        if not pools:
            raise ValueError("InceptionFeatures: no images")
        out = (np.concatenate(pools), np.concatenate(logits))
        return out + (np.concatenate(spatials),) if spatial else out
