"""Tokenizer reconstruction evaluation: PSNR (both conventions), SSIM, LPIPS, rFID, codebook usage, coarse-to-fine PSNR.

    res = evaluate_reconstruction(tok.encode, lambda idx, g: tok.decode(idx, groups_to_use=g),
                                  metrics.ImageFolder("imagenet/val", size=(256, 256)), groups=G, codebook_size=K)

The command line is `mgvq evaluate-tokenizer` (pipelines/evaluate_tokenizer.py: it loads the tokenizer and LPIPS and
passes their functions; this module never imports the stages).

Protocol (MGVQ's eval_recon.py):
- image -> RGB -> bicubic resize so it covers the target -> centre crop (256, 512, or 2560x1440 "2k" for UHDBench);
- [-1, 1] -> encode -> indices (B, h, w, G) -> decode -> clamp -> uint8 (what a PNG of the reconstruction holds);
  every metric is computed on these uint8 reconstructions;
- PSNR: `psnr_of_mean_mse` (MGVQ: PSNR of the dataset-mean MSE on [0, 1]) and `psnr_mean_of_images` (LlamaGen: mean of
  per-image PSNR); SSIM: skimage on uint8 HWC, channel_axis=-1, data_range=255; LPIPS: the callable passed in, on
  [-1, 1] inputs (MGVQ fed [0, 1] to VGG-LPIPS, which is not reproduced); rFID: Fréchet distance of Inception pool
  features, reconstructions vs the centre-cropped originals (LlamaGen's val-npz protocol; MGVQ used clean-fid);
- per group g: the fraction of its K codes used and the perplexity of its code histogram;
- coarse-to-fine (paper Table 6): PSNR when decoding with groups_to_use = 1..G (later groups zeroed);
- side-by-side PNGs (original | reconstruction) of the lowest- and highest-PSNR images.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from evaluation import metrics as M

RESOLUTIONS = {"256": (256, 256), "512": (512, 512), "2k": (2560, 1440)}


def parse_resolution(text: str) -> tuple[int, int]:
    """'256' / '512' / '2k' (2560x1440, UHDBench) / 'WxH' -> (width, height)."""
    t = str(text).lower()
    if t in RESOLUTIONS:
        return RESOLUTIONS[t]
    try:
        if "x" in t:
            w, h = (int(v) for v in t.split("x"))
        else:
            w = h = int(t)
    except ValueError:
        raise ValueError(f"resolution={text!r}: valid are 256, 512, 2k (2560x1440), an int N or WxH") from None
    if w < 1 or h < 1:
        raise ValueError(f"resolution={text!r}: width and height must be positive")
    return w, h


@torch.no_grad()
def evaluate_reconstruction(encode_fn: Callable, decode_fn: Callable, images: Sequence, groups: int,
                            codebook_size: int | None = None, lpips_fn: Callable | None = None,
                            inception: M.InceptionFeatures | None = None, batch_size: int = 8,
                            coarse_to_fine: bool = True, num_examples: int = 4, out_dir=None, device="cpu",
                            progress: bool = True) -> dict:
    """Reconstruction metrics of a tokenizer given as callables.

    encode_fn(x (B, 3, H, W) in [-1, 1]) -> indices (B, h, w, G) int; decode_fn(indices, groups_to_use) -> [-1, 1]
    (groups_to_use None = all). groups=0: a continuous tokenizer (an autoencoder / VAE): encode_fn returns its latent,
    decode_fn(latent, None) decodes it, and usage / coarse-to-fine are absent from the result.
    `images`: uint8 (H, W, 3) arrays of one size (an (N, H, W, 3) array or e.g.
    `metrics.ImageFolder(dir, size=(256, 256))`). `lpips_fn(x, y)` with x, y in [-1, 1] -> per-image distances.
    `inception` (optional) adds rFID. With `out_dir`, writes examples/{worst,best}_*.png (original | reconstruction).
    """
    n = len(images)
    if n < 1:
        raise ValueError("evaluate_reconstruction: no images")
    if groups < 0:
        raise ValueError(f"evaluate_reconstruction: groups={groups} must be >= 1 (or 0 for a continuous tokenizer)")
    coarse_to_fine = coarse_to_fine and groups > 0
    mse, ssim, lp = [], [], []
    mse_by_groups = {g: [] for g in range(1, groups + 1)} if coarse_to_fine else {}
    counts = None if codebook_size is None or not groups else torch.zeros(groups, codebook_size, dtype=torch.long)
    distinct = [set() for _ in range(groups)] if codebook_size is None else None
    pool_x, pool_r, examples = [], [], []  # examples: (psnr, index, original HWC, recon HWC)
    t0, start = time.time(), 0
    for x_u8 in M.iter_batches(images, batch_size):
        b = x_u8.shape[0]
        x = (x_u8.float() / 127.5 - 1).to(device)
        idx = encode_fn(x)
        if groups and (not torch.is_tensor(idx) or idx.dim() != 4 or idx.shape[0] != b or idx.shape[-1] != groups):
            got = tuple(idx.shape) if torch.is_tensor(idx) else type(idx).__name__
            raise ValueError(f"encode_fn must return indices (B={b}, h, w, G={groups}), got {got}")
        r_u8 = M.to_uint8((decode_fn(idx, None).float().cpu() + 1) / 2)
        if r_u8.shape != x_u8.shape:
            raise ValueError(f"decode_fn returned {tuple(r_u8.shape)} for inputs {tuple(x_u8.shape)}")
        batch_mse = M.per_image_mse(x_u8, r_u8)
        mse.append(batch_mse)
        xh, rh = M.nchw_to_nhwc(x_u8), M.nchw_to_nhwc(r_u8)
        ssim.append(M.ssim_per_image(xh, rh))
        if lpips_fn is not None:
            d = lpips_fn(x, (r_u8.float() / 127.5 - 1).to(device))
            lp.append(torch.as_tensor(d).float().reshape(b, -1).mean(1).cpu().numpy())
        idx_cpu = idx.long().cpu().reshape(-1, groups) if groups else None
        for g in range(groups):
            if counts is not None:
                if idx_cpu[:, g].min() < 0 or idx_cpu[:, g].max() >= codebook_size:
                    raise ValueError(f"group {g} indices outside [0, codebook_size={codebook_size})")
                counts[g] += torch.bincount(idx_cpu[:, g], minlength=codebook_size)
            else:
                distinct[g].update(idx_cpu[:, g].unique().tolist())
        for g in mse_by_groups:
            if g == groups:
                mse_by_groups[g].append(batch_mse)
            else:
                rg = M.to_uint8((decode_fn(idx, g).float().cpu() + 1) / 2)
                mse_by_groups[g].append(M.per_image_mse(x_u8, rg))
        if inception is not None:
            pool_x.append(inception(x_u8)[0])
            pool_r.append(inception(r_u8)[0])
        if num_examples > 0:
            psnr = M.psnr_from_mse(batch_mse)
            examples += [(float(psnr[j]), start + j, xh[j], rh[j]) for j in range(b)]
            examples.sort(key=lambda e: (e[0], e[1]))
            if len(examples) > 2 * num_examples:
                examples = examples[:num_examples] + examples[-num_examples:]
        start += b
        if progress and (start // batch_size) % 50 == 0:
            print(f"{start}/{n} images ({start / (time.time() - t0):.1f} img/s)", flush=True)

    mse = np.concatenate(mse)
    res = {
        "num_images": n, "resolution": f"{images[0].shape[1]}x{images[0].shape[0]}", "groups": groups,
        "psnr_of_mean_mse": float(M.psnr_from_mse(mse.mean())),
        "psnr_mean_of_images": float(M.psnr_from_mse(mse).mean()),
        "ssim": float(np.concatenate(ssim).mean()),
        "lpips": float(np.concatenate(lp).mean()) if lp else None,
        "rfid": None,
    }
    if inception is not None:
        pool_x, pool_r = np.concatenate(pool_x), np.concatenate(pool_r)
        if n >= 2:
            res["rfid"] = M.frechet_distance_to_features(pool_r, *M.feature_statistics(pool_x))
    if not groups:
        pass  # continuous latent: no codes
    elif counts is not None:
        p = counts.double() / counts.sum(1, keepdim=True)
        ent = -(p * p.clamp_min(1e-30).log()).sum(1)
        res["codebook_size"] = codebook_size
        res["codebook_usage"] = [float(u) for u in (counts > 0).double().mean(1)]
        res["codebook_perplexity"] = [float(e) for e in ent.exp()]
    else:
        res["codes_used"] = [len(s) for s in distinct]
    if mse_by_groups:
        res["psnr_of_mean_mse_by_groups_to_use"] = {
            str(g): float(M.psnr_from_mse(np.concatenate(v).mean())) for g, v in mse_by_groups.items()}
        res["psnr_mean_of_images_by_groups_to_use"] = {
            str(g): float(M.psnr_from_mse(np.concatenate(v)).mean()) for g, v in mse_by_groups.items()}
    if out_dir is not None and examples:
        res["examples"] = _write_examples(Path(out_dir) / "examples", examples, num_examples)
    return res


def _write_examples(folder: Path, examples, k: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    worst, best = examples[:k], examples[::-1][:k]
    if len(examples) < 2 * k:  # fewer images than 2k: split them without repeating any
        half = (len(examples) + 1) // 2
        worst, best = examples[:half], examples[half:][::-1]
    names = []
    for tag, group in (("worst", worst), ("best", best)):
        for r, (psnr, i, x, y) in enumerate(group, 1):
            name = f"{tag}_{r:02d}_img{i:06d}_psnr{psnr:.2f}.png"
            Image.fromarray(np.concatenate([x, y], axis=1)).save(folder / name)
            names.append(name)
    return names


def format_table(res: dict) -> str:
    rows = [("images", res["num_images"]), ("resolution", res["resolution"]),
            ("PSNR (dataset-mean MSE, MGVQ)", res["psnr_of_mean_mse"]),
            ("PSNR (mean of images, LlamaGen)", res["psnr_mean_of_images"]),
            ("SSIM", res["ssim"]), ("LPIPS", res["lpips"]), ("rFID", res["rfid"])]
    if "codebook_usage" in res:
        rows.append(("codebook usage per group", " ".join(f"{u:.3f}" for u in res["codebook_usage"])))
        rows.append(("code perplexity per group", " ".join(f"{u:.1f}" for u in res["codebook_perplexity"])))
    for g, v in res.get("psnr_of_mean_mse_by_groups_to_use", {}).items():
        rows.append((f"PSNR groups_to_use={g}", v))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}"
                     for k, v in rows)


if __name__ == "__main__":
    sys.exit("the evaluate-tokenizer command moved to the pipelines (evaluation/ is a library): run "
             "`mgvq evaluate-tokenizer ...` or `python -m pipelines.evaluate_tokenizer ...` (same flags)")
