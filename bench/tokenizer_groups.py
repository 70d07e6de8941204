"""The paper's tokenizer ablation at CPU scale (MGVQ Tables 1 / 5 / 6 in small): one command, one table.

    python bench/tokenizer_groups.py                                  # the table in docs/results.md (2 seeds at once)
    python bench/tokenizer_groups.py --seeds 0 --rows single ae g8-nested --steps 300    # a quick look

Defaults (why: docs/results.md): the DC-AE backbone (mgvq-dcae-tiny layout, widths 16-32-64-64-64, f16) on 32 px crops
(a 2x2 grid of tokens, each covering 16 x 16 x 3 values as in the paper's f16 c32 tokenizers), batch 16, 2400 steps
(at 1200 the continuous AE is only 2.95 dB above the single codebook, at 2400 3.76 dB), AdamW lr 1e-3 with cosine
decay; `--backbone vqgan` uses LlamaGen's conv VQGAN (mgvq-tiny layout) instead. Every row is the same backbone
trained by `tokenizer.train` for the same number of steps on the same data (random crops of the colour photos bundled with
scikit-image), with the same losses (L2 + Charbonnier + the bottleneck's own term; LPIPS / GAN off to keep it short);
only the bottleneck differs:

  single          one codebook, G=1, C=8, `--total-codes` codes (LlamaGen's layout: small code dim, big codebook)
  g4 / g8         MGVQ: C=32 split into G sub-tokens, `--total-codes`/G codes per sub-codebook, no nested masking
  g4-nested / g8-nested   the same with nested masking (G=4: the paper's [.2, .1, .1, .6]; G=8: our assumption,
                  tokenizer.quantizer.default_keep_probs(8) = [.2, 1/30 x 6, .6])
  g8-nested+ft    the released two-stage recipe: g8-nested for (1 - `--ft-frac`) of the steps, then a mask-free
                  fine-tune (init_from the stage-1 weights, nested_keep_probs=None) for the rest: same total steps
                  (diagnostic g8+nested-ft: the reverse, mask-free first, nested masking in the fine-tune)
  ae / kl         continuous baselines with C=32: a plain autoencoder and an SD-VAE-style KL VAE (kl_weight 1e-6)
  sdvae-f8c4      the paper's VAE in its own terms: a KL VAE shaped like SD-VAE (f8, C=4), the same blocks at the
                  first 4 levels of --widths (default 16-32-64-64), so 4x4x4 latents where the other rows have 2x2x32
  plus the diagnostic rows in ROWS (each one changes one thing about g8 / g8-nested; see docs/results.md).

Evaluation (evaluation.reconstruct.evaluate_reconstruction, on uint8 reconstructions) on 2048 held-out crops (another
seed: new random crops and scales of the same photos): PSNR of the dataset-mean MSE (MGVQ's convention), SSIM, LPIPS
(VGG; skipped if the weights are absent), codebook usage per group (fraction of the K codes used on the held-out
crops), and PSNR when decoding only the first k groups (groups_to_use = 1..G, coarse to fine).
Beside the held-out crops, every row is scored on data the training never draws from (the paper's zero-shot claim):
  zero-shot       ZERO_SHOT_PHOTOS, 9 photos bundled with scikit-image that are not training photos (checked by name
                  and by content: check_not_training), or the images of --zero-shot-dir; each centre-cropped to a
                  square of its short side and resized with PIL bicubic to 1x / 2x / 4x / 8x the crop size (the
                  paper's resolution table in small; multiples of every row's f since the crop size is one)
  other domain    the first --eval-crops Fashion-MNIST test images (grey -> RGB, bicubic 28 -> crop size; the column
                  is skipped with a note when the Debian package dataset-fashion-mnist / --fashion-mnist-dir is absent)
  quant error     VQ rows: ||z - q(z)||^2 / ||z||^2 per group (z the quantizer's input, L2-normalised per group
                  when l2_norm, as the codes see it; q(z) its nearest code) on the held-out crops, the zero-shot
                  photos at each size and the other domain: do new latents fall off the codebook?
results.json per row: "zero_shot" {"<size>": PSNR}, "other_domain" {"name", "psnr", "note"}, "quant_error"
{"held_out", "zero_shot" {"<size>"}, "other_domain", "by_group"} (None for continuous rows); a second table prints them.
Several seeds run as parallel processes (one torch thread each; `--jobs 1` runs them one after the other); the table
gives the per-seed PSNRs and the means. bench/tokenizer_group_use.py then tells which groups the decoder actually uses.
Writes <out>/results.json (all numbers, per seed) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.reconstruct import evaluate_reconstruction  # noqa: E402
from tokenizer import MGVQTokenizer  # noqa: E402
from tokenizer.data import IMAGE_EXTS, SKIMAGE_PHOTOS, load_rgb, skimage_crops, skimage_photos  # noqa: E402
from tokenizer.quantizer import default_keep_probs  # noqa: E402
from tokenizer.train import TrainConfig, train  # noqa: E402


def _mgvq(groups: int, nested: bool, total: int, **extra) -> dict:
    return dict(groups=groups, latent_dim=32, codebook_size=total // groups,
                nested_keep_probs=default_keep_probs(groups) if nested else None) | extra


def rows(total: int) -> dict[str, dict]:
    """name -> {"model": model_overrides, "train": TrainConfig overrides, "stages": 1 | 2, "what": description}."""
    r = {
        "single": dict(model=dict(groups=1, latent_dim=8, codebook_size=total, nested_keep_probs=None),
                       what=f"single codebook G=1 C=8 K={total}"),
        "g4": dict(model=_mgvq(4, False, total), what=f"MGVQ G=4 C=32 K={total // 4}x4, no masking"),
        "g4-nested": dict(model=_mgvq(4, True, total), what="MGVQ G=4, nested masking [.2 .1 .1 .6]"),
        "g8": dict(model=_mgvq(8, False, total), what=f"MGVQ G=8 C=32 K={total // 8}x8, no masking"),
        "g8-nested": dict(model=_mgvq(8, True, total), what="MGVQ G=8, nested masking (our G=8 schedule)"),
        "g8-nested+ft": dict(model=_mgvq(8, True, total), stages=2, stage2={"nested_keep_probs": None},
                             what="MGVQ G=8, nested then mask-free fine-tune"),
        "ae": dict(model=dict(quantizer="none", latent_dim=32, groups=1), what="continuous AE C=32"),
        "kl": dict(model=dict(quantizer="kl", latent_dim=32, groups=1), what="continuous KL-VAE C=32 (kl 1e-6)"),
        # the paper's VAE in its own terms: SD-VAE's shape (f8, C=4), same blocks, the first 4 --widths levels
        "sdvae-f8c4": dict(model=dict(quantizer="kl", latent_dim=4, groups=1), downsample=8,
                           what="SD-VAE shape: KL-VAE f8 C=4 (kl 1e-6)"),
        # diagnostics: each changes one thing about g8 / g8-nested (docs/results.md)
        "g8-nested-pairs": dict(model=_mgvq(8, False, total, nested_keep_probs=[0, .2, 0, .1, 0, .1, 0, .6]),
                                what="G=8, G=4's schedule on pairs (k=2,4,6,8)"),
        "g8-avg": dict(model=_mgvq(8, False, total), train={"loss": {"codebook_weight": 1 / 8}},
                       what="G=8 no masking, codebook loss averaged over G"),
        "g8-nested-avg": dict(model=_mgvq(8, True, total), train={"loss": {"codebook_weight": 1 / 8}},
                              what="G=8 nested, codebook loss averaged over G"),
        "g8-nested-lr2x": dict(model=_mgvq(8, True, total), lr_mult=2.0, what="G=8 nested, 2x learning rate"),
        "g8-nested-nol2": dict(model=_mgvq(8, True, total, l2_norm=False),
                               what="G=8 nested, no L2 norm (plain STE, raw codes)"),
        "single-nol2": dict(model=dict(groups=1, latent_dim=8, codebook_size=total, nested_keep_probs=None,
                                       l2_norm=False), what=f"single codebook G=1 C=8 K={total}, no L2 norm"),
        "g8-nol2": dict(model=_mgvq(8, False, total, l2_norm=False), what="G=8 no masking, no L2 norm"),
        "g8+nested-ft": dict(model=_mgvq(8, False, total), stages=2,
                             stage2={"nested_keep_probs": default_keep_probs(8)},
                             what="G=8 mask-free, then a nested fine-tune (reversed)"),
        "g8-nested-sample": dict(model=_mgvq(8, True, total, nested_mask_per="sample"),
                                 what="G=8 nested, one k per image (not per batch)"),
        "g8-nested-2x": dict(model=_mgvq(8, True, total), steps_mult=2.0, what="G=8 nested, 2x steps"),
        "g8-2x": dict(model=_mgvq(8, False, total), steps_mult=2.0, what="G=8 no masking, 2x steps"),
        # why the VQ rows lose zero-shot (issue 21): each changes one thing about g8 (the mask-free G=8; g8-nol2 above
        # is the l2-normalised-codes explanation); EXPLAIN_ROWS runs them
        "g8-noreinit": dict(model=_mgvq(8, False, total, dead_code_reinit=False),
                            what="G=8 no masking, no dead-code re-init"),
        "g8-ema": dict(model=_mgvq(8, False, total, codebook_update="ema"),
                       what="G=8 no masking, EMA codebook (decay .99)"),
        "g8-beta1": dict(model=_mgvq(8, False, total, beta=1.0), what="G=8 no masking, commitment beta 1.0 (.25)"),
        "g8-k4x": dict(model=_mgvq(8, False, 4 * total), what=f"G=8 no masking, 4x codes K={4 * total // 8}x8"),
        "g8-grey": dict(model=_mgvq(8, False, total), data="grey",
                        what=f"G=8 no masking, {GREY_FRACTION:.0%} of crops greyscale"),
        "g8-diverse": dict(model=_mgvq(8, False, total), data="diverse", trains_on={"skimage9"},
                           what="G=8 no masking, every offline photo, more scales"),
        "g8-crop2x": dict(model=_mgvq(8, False, total), crop_mult=2,
                          what="G=8 no masking, 2x crops (4x4 tokens), batch / 4"),
    }
    return r


DEFAULT_ROWS = ["single", "ae", "g8", "g8-nested", "g8-nested+ft", "g4", "g4-nested", "kl", "sdvae-f8c4"]
EXPLAIN_ROWS = ["g8-nol2", "g8-noreinit", "g8-ema", "g8-beta1", "g8-k4x", "g8-grey", "g8-diverse", "g8-crop2x"]
GREY_FRACTION = 0.25  # row g8-grey: share of training crops turned greyscale (PIL "L", as the grey zero-shot photos)


# ---- evaluation sets: held-out crops of the training photos, zero-shot photos, another domain ---------------------
def held_out(n: int, size: int, seed: int) -> np.ndarray:
    return skimage_crops(n, size, seed=10_000 + seed)[0]  # uint8 (n, S, S, 3); training uses seed `seed`


# The zero-shot source: photos bundled with scikit-image (so on every machine the README sets up) that training never
# draws from (it crops tokenizer.data.SKIMAGE_PHOTOS). Left out: the right image of the stereo motorcycle pair (the
# left one is a training photo), documents (page, text), images under 256 px (microaneurysms, lfw_subset) and the
# synthetic ones (colorwheel, logo, checkerboard, horse, phantom, binary_blobs). All but retina are greyscale (-> RGB).
ZERO_SHOT_PHOTOS = ("retina", "camera", "coins", "moon", "grass", "gravel", "brick", "cell", "clock")
ZERO_SHOT_SCALES = (1, 2, 4, 8)  # x the training crop size: the paper's resolution table in small
NEAR_DUPLICATE = 0.7  # correlation of 16 x 16 grey thumbnails at which a photo counts as a training photo


def _thumb(photo: np.ndarray) -> np.ndarray:
    t = np.asarray(Image.fromarray(photo).convert("L").resize((16, 16), Image.BOX), np.float64).ravel()
    t = t - t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-9)


def check_not_training(photos: dict[str, np.ndarray]) -> None:
    """Raise if a zero-shot photo is a training photo: same name, or the same whole image (grey 16 x 16 thumbnails
    correlated >= NEAR_DUPLICATE, mirrored too; distinct bundled photos stay below 0.42, the stereo pair's two
    views are at 0.86). A crop of a training photo is not detected: keep the sources apart by where they come from."""
    training = dict(zip(SKIMAGE_PHOTOS, skimage_photos()))
    same = sorted(set(photos) & set(training))
    if same:
        raise ValueError(f"zero-shot photos {same} are training photos (tokenizer.data.SKIMAGE_PHOTOS)")
    thumbs = {n: _thumb(p) for n, p in training.items()}
    for name, photo in photos.items():
        for t in (_thumb(photo), _thumb(np.ascontiguousarray(photo[:, ::-1]))):
            for train_name, u in thumbs.items():
                if float(t @ u) >= NEAR_DUPLICATE:
                    raise ValueError(f"zero-shot photo {name!r} is a near-duplicate of the training photo "
                                     f"{train_name!r} (thumbnail correlation {float(t @ u):.2f} >= {NEAR_DUPLICATE})")


def zero_shot_photos(folder: str | None = None, pattern: str = "*") -> dict[str, np.ndarray]:
    """name -> uint8 RGB photo, none of them a training photo: scikit-image's ZERO_SHOT_PHOTOS, or the images in
    `folder` whose names match `pattern` (e.g. foolbox's ImageNet photos or opencv-doc's examples/data)."""
    if folder is None:
        from skimage import data

        photos = {n: np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in ZERO_SHOT_PHOTOS}
    else:
        files = sorted(f for f in Path(folder).glob(pattern) if f.suffix.lower() in IMAGE_EXTS) if Path(
            folder).is_dir() else []
        if not files:
            raise FileNotFoundError(f"zero-shot folder {folder}: no images ({', '.join(IMAGE_EXTS)}) matching "
                                    f"{pattern!r} in it")
        photos = {f.stem: np.asarray(load_rgb(f)) for f in files}
    check_not_training(photos)
    return photos


def foolbox_data() -> Path | None:
    """foolbox's bundled sample folder (20 ImageNet validation photos, 512 px colour, plus CIFAR / MNIST samples), found
    without importing foolbox; None when it is not installed (pip install foolbox==3.3.4, in the dev extra)."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    return folder if folder is not None and folder.is_dir() else None


def zero_shot_sets(folder: str | None = None) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """(set name -> photos, notes). Default: "imagenet20" (foolbox's 20 ImageNet photos, colour; the first set, the
    one a row's `zero_shot` reports) when foolbox is installed, then "skimage9" (ZERO_SHOT_PHOTOS, 8 of 9 grey);
    `folder`: that folder alone, as set "dir"."""
    if folder is not None:
        return {"dir": zero_shot_photos(folder)}, []
    sets, notes = {}, []
    fb = foolbox_data()
    if fb is not None:
        sets["imagenet20"] = zero_shot_photos(str(fb), "imagenet_*")
    else:
        notes.append("imagenet20 skipped: foolbox is not installed (pip install foolbox==3.3.4)")
    sets["skimage9"] = zero_shot_photos()
    return sets, notes


def zero_shot_sizes(image_size: int) -> list[int]:
    """1x, 2x, 4x and 8x the training crop size (multiples of f, since the crop size is)."""
    return [k * image_size for k in ZERO_SHOT_SCALES]


def square(photo: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square of the short side, then a PIL bicubic resize to size x size -> uint8 (S, S, 3)."""
    h, w = photo.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.asarray(Image.fromarray(photo[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))


def zero_shot_images(photos: dict[str, np.ndarray], sizes: list[int]) -> dict[int, np.ndarray]:
    """size -> uint8 (n_photos, S, S, 3), every photo at every size."""
    return {s: np.stack([square(p, s) for p in photos.values()]) for s in sizes}


def other_domain(n: int, size: int, folder: str | None) -> tuple[np.ndarray | None, str]:
    """The first n Fashion-MNIST test images (grey -> RGB, PIL bicubic 28 -> size px) and a note; (None, why) when the
    data is absent (Debian dataset-fashion-mnist, or `folder`; nothing is downloaded)."""
    from pipelines.fashion_mnist import load_fashion_mnist

    try:
        images = load_fashion_mnist("test", folder, download=False)[0][:n]
    except FileNotFoundError as e:
        return None, f"skipped: {e}"
    out = np.stack([np.asarray(Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC)) for a in images])
    return out, f"{len(out)} test images, grey -> RGB, bicubic 28 -> {size} px"


def row_widths(name: str, spec: dict, widths: list[int]) -> list[int]:
    """The row's width per resolution level: all of --widths, or, for a row with its own downsample factor f
    (sdvae-f8c4), the first log2(f) + 1 levels of --widths (the same blocks, fewer downsamplings)."""
    f = spec.get("downsample")
    if f is None:
        return list(widths)
    levels = f.bit_length()  # f = 2^(levels - 1)
    if f < 2 or f & (f - 1) or levels > len(widths):
        raise ValueError(f"row {name} needs f{f}: --widths must have at least {levels} levels (f = 2^(levels - 1)), "
                         f"got {list(widths)} (f{2 ** (len(widths) - 1)})")
    return list(widths[:levels])


def backbone(args, widths: list[int]) -> tuple[str, dict]:
    """(preset, model_overrides) of the shared encoder / decoder at these widths; f = 2^(len(widths) - 1)."""
    n = len(widths)
    if args.backbone == "vqgan":  # LlamaGen's conv VQGAN (mgvq-tiny layout); widths = ch * ch_mult
        ch = widths[0]
        return "mgvq-tiny", {"vqgan.ch": ch, "vqgan.ch_mult": [w // ch for w in widths]}
    # DC-AE (the released MGVQ backbone family, mgvq-dcae-tiny layout): stage 0 is the pixel-unshuffle stem, then
    # ResBlock stages and one EViT_GLU stage at the lowest resolution (BatchNorm / ReLU in the decoder's ResBlock
    # stages, RMSNorm / SiLU in the EViT stage, as released)
    blocks = ["ResBlock"] * (n - 1) + ["EViT_GLU"]
    return "mgvq-dcae-tiny", {"dcae.width_list": list(widths), "dcae.encoder_depth_list": [0] + [args.depth] * (n - 1),
                              "dcae.decoder_depth_list": [0] + [args.depth] * (n - 1), "dcae.block_type": blocks,
                              "dcae.decoder_norm": ["bn2d"] * (n - 1) + ["trms2d"],
                              "dcae.decoder_act": ["relu"] * (n - 1) + ["silu"]}


def train_images(kind: str, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A row's own training set (uint8 (n, S, S, 3), labels), drawn like the default skimage crops:
    "grey"     the default crops, GREY_FRACTION of them (a seeded choice) turned greyscale with PIL's "L" -> RGB
    "diverse"  every offline photo source except the imagenet20 zero-shot set: the 8 training photos, the 9
               ZERO_SHOT_PHOTOS (so this row has no skimage9 column) and matplotlib's grace_hopper at 4 scales from
               1/16 to 1/2 (whole photo ... the default crops' scale), 3/4 of the crops; foolbox's 40 CIFAR-10/100
               samples (whole 32 px images) the other 1/4."""
    if kind == "grey":
        x, labels = skimage_crops(n, size, seed=seed)
        pick = np.random.default_rng(seed + 7).random(n) < GREY_FRACTION
        x[pick] = np.stack([np.asarray(Image.fromarray(a).convert("L").convert("RGB")) for a in x[pick]])
        return x, labels
    if kind == "diverse":
        import matplotlib.cbook
        from skimage import data

        fb = foolbox_data()
        if fb is None:
            raise FileNotFoundError("row g8-diverse needs foolbox's CIFAR samples: pip install foolbox==3.3.4")
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            hopper = np.asarray(load_rgb(f.read()))
        photos = skimage_photos() + [np.asarray(Image.fromarray(getattr(data, k)()).convert("RGB"))
                                     for k in ZERO_SHOT_PHOTOS] + [hopper]
        cifar = [np.asarray(load_rgb(f)) for f in sorted(fb.glob("cifar*.png"))]
        n1 = 3 * n // 4
        x1, y1 = skimage_crops(n1, size, seed=seed, scales=(1 / 16, 1 / 2), photos=photos)
        x2, y2 = skimage_crops(n - n1, size, seed=seed + 1, scales=(1.0, 1.0), photos=cifar)
        return np.concatenate([x1, x2]), np.concatenate([y1, y2 + len(photos)])
    raise ValueError(f"unknown training data {kind!r}; valid: grey, diverse")


def write_train_data(kind: str, n: int, size: int, seed: int, folder: Path) -> str:
    """train_images as a `datasets` folder (save_to_disk) that tokenizer.train reads like any user dataset."""
    import datasets

    if not (folder / "dataset_info.json").exists():
        x, labels = train_images(kind, n, size, seed)
        ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in x], "label": labels.tolist()},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
        ds.save_to_disk(str(folder))
    return str(folder)


def train_row(name: str, spec: dict, args, seed: int, out: Path) -> tuple[Path, bool]:
    """Train one row with tokenizer.train -> (its save_pretrained folder, trained now). With args.reuse a row whose
    final folder exists is loaded as it is (same settings assumed: delete the folder to retrain)."""
    steps = round(args.steps * spec.get("steps_mult", 1.0))
    stages = spec.get("stages", 1)
    final = out / name / "final"
    if args.reuse and (final / "config.json").exists():
        return final, False
    crop = args.image_size * spec.get("crop_mult", 1)  # a row's own training crop size (evaluation stays the same)
    batch = max(1, args.batch_size // spec.get("crop_mult", 1) ** 2)  # same pixels per step
    preset, arch = backbone(args, row_widths(name, spec, args.widths))
    model = {**arch, "reinit_decay": args.reinit_decay, "image_size": crop, **spec["model"]}
    base = dict(model=preset, data="skimage", num_crops=args.num_crops, image_size=crop,
                batch_size=batch, lr=args.lr * spec.get("lr_mult", 1.0), lr_schedule=args.lr_schedule, precision="fp32", resume=None,
                seed=seed, num_samples=0, log_every=50, log_with="none",
                loss={"perceptual_weight": 0.0, "disc_weight": 0.0})
    if "data" in spec:
        base |= dict(data=write_train_data(spec["data"], args.num_crops, crop, seed, out / f"data-{spec['data']}-{args.num_crops}x{crop}"),
                     augmentation="resize")
    for k, v in spec.get("train", {}).items():
        base[k] = base[k] | v if k == "loss" else v
    if stages == 1:
        run = out / name
        train(TrainConfig(**base, model_overrides=model, steps=steps, save_every=steps, sample_every=steps,
                          out_dir=str(run)))
        return final, True
    s1 = max(1, round(steps * (1 - args.ft_frac)))
    s2 = steps - s1
    run1, run2 = out / f"{name}.stage1", out / name
    train(TrainConfig(**base, model_overrides=model, steps=s1, save_every=s1, sample_every=s1, out_dir=str(run1)))
    train(TrainConfig(**base, init_from=str(run1 / "final"), model_overrides=spec["stage2"],
                      steps=s2, save_every=s2, sample_every=s2, out_dir=str(run2)))
    return final, True


def _codec(tok: MGVQTokenizer) -> tuple:
    """(encode_fn, decode_fn, groups) as evaluation.reconstruct takes them (groups 0: a continuous latent)."""
    tok.eval()
    if tok.is_quantized:
        return tok.encode, (lambda idx, g: tok.decode(idx, groups_to_use=g)), tok.config.groups
    return tok.encode_latent, (lambda z, g: tok.decode_latent(z)), 0


def evaluate(tok: MGVQTokenizer, images: np.ndarray, lpips_fn) -> dict:
    enc, dec, groups = _codec(tok)
    r = evaluate_reconstruction(enc, dec, images, groups=groups, codebook_size=tok.config.codebook_size,
                                lpips_fn=lpips_fn, batch_size=128, num_examples=0, progress=False)
    by_k = r.get("psnr_of_mean_mse_by_groups_to_use", {})
    return {"psnr": r["psnr_of_mean_mse"], "ssim": r["ssim"], "lpips": r["lpips"],
            "usage": r.get("codebook_usage"), "psnr_by_groups": [by_k[k] for k in sorted(by_k, key=int)]}


def psnr(tok: MGVQTokenizer, images: np.ndarray) -> float:
    """PSNR of the dataset-mean MSE of uint8 reconstructions (the held-out column's convention), any image size."""
    enc, dec, groups = _codec(tok)
    return evaluate_reconstruction(enc, dec, images, groups=groups, batch_size=32, coarse_to_fine=False,
                                   num_examples=0, progress=False)["psnr_of_mean_mse"]


@torch.no_grad()
def quant_error(tok: MGVQTokenizer, images: np.ndarray, batch: int = 32) -> list[float]:
    """Per group: sum ||z - q(z)||^2 / sum ||z||^2 over every latent position of the images, z the quantizer's input
    as it is compared with the codes (per-group L2-normalised when l2_norm) and q(z) its nearest code."""
    tok.eval()
    q = tok.quantize
    G, D = q.groups, q.group_dim
    num, den = torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = tok.encode_latent(x).float()
        zq = q.lookup(q.encode_indices(z)).float()
        zg, qg = (t.permute(0, 2, 3, 1).reshape(-1, G, D) for t in (z, zq))
        if q.l2_norm:
            zg = F.normalize(zg, dim=-1)
        num += (zg - qg).pow(2).sum((0, 2)).double()
        den += zg.pow(2).sum((0, 2)).double()
    return (num / den).tolist()


def tiles(images: np.ndarray, tile: int) -> np.ndarray:
    """(n, S, S, 3) -> (n * (S / tile)^2, tile, tile, 3): the images cut into a grid of tile x tile pieces."""
    n, S = images.shape[:2]
    k = S // tile
    return images.reshape(n, k, tile, k, tile, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n * k * k, tile, tile, 3)


def transfer(tok: MGVQTokenizer, held: np.ndarray, zero_shot: dict[str, dict[int, np.ndarray]],
             other: np.ndarray | None, other_note: str, trains_on: set[str] = frozenset()) -> dict:
    """Zero-shot PSNR per set and size (None for a set the row trains on), the same images coded in independent
    tiles of the training crop size (`zero_shot_tiled_sets`: the PSNR of the stitched image; what a larger image
    costs beyond its content), the other domain's PSNR and, for a VQ row, the quantization error per set.
    `zero_shot` / `zero_shot_set`: the first set the row does not train on."""
    crop = held.shape[1]
    sets = {n: (None if n in trains_on else {str(s): psnr(tok, x) for s, x in by_size.items()})
            for n, by_size in zero_shot.items()}
    tiled = {n: (None if n in trains_on else {str(s): psnr(tok, tiles(x, crop)) for s, x in by_size.items()})
             for n, by_size in zero_shot.items()}
    primary = next((n for n, v in sets.items() if v is not None), None)
    r = {"zero_shot": sets.get(primary), "zero_shot_set": primary, "zero_shot_sets": sets,
         "zero_shot_tiled_sets": tiled,
         "other_domain": {"name": "fashion-mnist", "psnr": None if other is None else psnr(tok, other),
                          "note": other_note},
         "quant_error": None}
    if tok.is_quantized:
        by_group = {"held_out": quant_error(tok, held)}
        for n, by_size in zero_shot.items():
            if n not in trains_on:
                by_group |= {f"{n}/{s}": quant_error(tok, x) for s, x in by_size.items()}
        if other is not None:
            by_group["other_domain"] = quant_error(tok, other)
        mean = {k: float(np.mean(v)) for k, v in by_group.items()}
        qsets = {n: (None if n in trains_on else {str(s): mean[f"{n}/{s}"] for s in by_size})
                 for n, by_size in zero_shot.items()}
        r["quant_error"] = {"held_out": mean["held_out"], "zero_shot": qsets.get(primary), "zero_shot_sets": qsets,
                            "other_domain": mean.get("other_domain"), "by_group": by_group}
    return r


def run_seed(args, seed: int) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out) / f"seed{seed}"
    images = held_out(args.eval_crops, args.image_size, seed)
    sets, notes = zero_shot_sets(args.zero_shot_dir)
    for note in notes:
        print(note, flush=True)
    zero_shot = {n: zero_shot_images(photos, zero_shot_sizes(args.image_size)) for n, photos in sets.items()}
    other, other_note = other_domain(args.eval_crops, args.image_size, args.fashion_mnist_dir)
    if other is None:
        print(f"fashion-mnist column {other_note}", flush=True)
    lpips_fn = None
    try:
        from tokenizer.lpips import load_lpips

        net = load_lpips("vgg", fetch=False).eval()
        lpips_fn = lambda x, y: net(x, y)  # noqa: E731
    except FileNotFoundError as e:
        print(f"LPIPS skipped: {e}")
    spec = rows(args.total_codes)
    results = {}
    for name in args.rows:
        t0 = time.time()
        folder, trained = train_row(name, spec[name], args, seed, out)
        tok = MGVQTokenizer.from_pretrained(str(folder))
        with torch.no_grad():
            results[name] = (evaluate(tok, images, lpips_fn)
                             | transfer(tok, images, zero_shot, other, other_note, spec[name].get("trains_on", set()))
                             | {"params": tok.num_parameters(), "seconds": time.time() - t0 if trained else None,
                                "reused": not trained})
        print(f"[seed {seed}] {name}: {json.dumps(results[name])}", flush=True)
    return results


def _fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def table(args, per_seed: dict[int, dict]) -> str:
    spec = rows(args.total_codes)
    seeds = sorted(per_seed)
    names = [n for n in args.rows if all(n in per_seed[s] for s in seeds)]

    def mean(name, key):
        vals = [per_seed[s][name][key] for s in seeds]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    lines = [f"{args.steps} steps, batch {args.batch_size}, lr {args.lr} {args.lr_schedule}, {args.backbone} widths "
             f"{args.widths} (f{2 ** (len(args.widths) - 1)}), {args.image_size}px scikit-image crops ({args.num_crops} train / "
             f"{args.eval_crops} held-out), {args.total_codes} codes per VQ model, seeds {seeds}",
             "PSNR: dataset-mean MSE; SSIM / LPIPS / usage / PSNR-by-k: mean over seeds; usage = min over groups",
             f"{'row':<14} {'bottleneck':<44} {'PSNR':>6} {'per seed':>13} {'SSIM':>6} {'LPIPS':>6} {'usage':>6}  "
             f"PSNR by groups_to_use = 1..G"]
    for n in names:
        ps = " / ".join(f"{per_seed[s][n]['psnr']:.2f}" for s in seeds)
        usage = [min(per_seed[s][n]["usage"]) for s in seeds if per_seed[s][n]["usage"]]
        by_k = np.mean([per_seed[s][n]["psnr_by_groups"] for s in seeds], axis=0) if per_seed[seeds[0]][n][
            "psnr_by_groups"] else []
        lines.append(f"{n:<14} {spec[n]['what']:<44} {mean(n, 'psnr'):>6.2f} {ps:>13} {_fmt(mean(n, 'ssim'), '{:.3f}'):>6} "
                     f"{_fmt(mean(n, 'lpips'), '{:.3f}'):>6} {_fmt(float(np.mean(usage)) if usage else None):>6}  "
                     + " ".join(f"{v:.2f}" for v in by_k))
    return "\n".join(lines + transfer_table(args, per_seed, names))


def transfer_table(args, per_seed: dict[int, dict], names: list[str]) -> list[str]:
    """Per zero-shot set: the zero-shot / other-domain PSNRs and quantization errors, means over seeds ("-": not
    measured, or a set the row trains on). Results from before the sets existed count as set "skimage9"."""
    seeds = sorted(per_seed)
    sizes = [str(s) for s in zero_shot_sizes(args.image_size)]

    def get(r, path):
        for k in path:
            r = r.get(k) if isinstance(r, dict) else None
        return r

    def mean(name, *path):
        vals = [get(per_seed[s][name], path) for s in seeds]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    def sets_of(r):  # {set: {size: psnr}}, {set: {size: qe}}, {set: {size: tiled psnr}}; old results -> skimage9
        if "zero_shot_sets" in r:
            return r["zero_shot_sets"], get(r, ["quant_error", "zero_shot_sets"]) or {}, r.get(
                "zero_shot_tiled_sets") or {}
        return {"skimage9": r.get("zero_shot")}, {"skimage9": get(r, ["quant_error", "zero_shot"])}, {}

    view = {s: {n: sets_of(per_seed[s][n]) for n in names} for s in seeds}

    def set_mean(name, which, zs_set, size):  # which: 0 PSNR, 1 quant error, 2 PSNR coded in tiles
        vals = [get(view[s][name][which], [zs_set, size]) for s in seeds]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    set_names = list(dict.fromkeys(k for s in seeds for n in names for k in view[s][n][0]))
    describe = {"imagenet20": "foolbox's 20 ImageNet validation photos (colour, 512 px)",
                "skimage9": f"{len(ZERO_SHOT_PHOTOS)} scikit-image photos {', '.join(ZERO_SHOT_PHOTOS)} (8 grey)",
                "dir": str(args.zero_shot_dir)}
    notes = {per_seed[s][n].get("other_domain", {}).get("note") for s in seeds for n in names} - {None}
    head = "  ".join(f"{'zs ' + z:>7}" for z in sizes)
    lines = [f"Zero-shot: none of the photos a training photo; centre square crop, PIL bicubic resize to "
             f"{' / '.join(sizes)} px (1x 2x 4x 8x the crop size); other domain: Fashion-MNIST "
             f"({'; '.join(sorted(notes)) or 'not measured'}); PSNR of the mean MSE, means over seeds",
             "quant error = ||z - q(z)||^2 / ||z||^2 of the quantizer's input (L2-normalised per group when l2_norm) "
             "and its nearest code, mean over groups"]
    for zs_set in set_names:
        lines += [f"zero-shot set {zs_set}: {describe.get(zs_set, zs_set)}",
                  f"{'row':<14} {'held-out':>8}  {head}  {'f-mnist':>7}   quant error: {'held-out':>8}  {head}  "
                  f"{'f-mnist':>7}"]
        for n in names:
            zs = "  ".join(f"{_fmt(set_mean(n, 0, zs_set, z)):>7}" for z in sizes)
            qe = "  ".join(f"{_fmt(set_mean(n, 1, zs_set, z), '{:.4f}'):>7}" for z in sizes)
            lines.append(f"{n:<14} {_fmt(mean(n, 'psnr')):>8}  {zs}  {_fmt(mean(n, 'other_domain', 'psnr')):>7}   "
                         f"{'':12} {_fmt(mean(n, 'quant_error', 'held_out'), '{:.4f}'):>8}  {qe}  "
                         f"{_fmt(mean(n, 'quant_error', 'other_domain'), '{:.4f}'):>7}")
    for zs_set in set_names:
        lines += [f"zero-shot set {zs_set} coded in independent {sizes[0]} px tiles (the PSNR of the stitched image):",
                  f"{'row':<14} {'held-out':>8}  {head}"]
        lines += [f"{n:<14} {_fmt(mean(n, 'psnr')):>8}  "
                  + "  ".join(f"{_fmt(set_mean(n, 2, zs_set, z)):>7}" for z in sizes) for n in names]
    return lines


def goals(per_seed: dict[int, dict], g8: str) -> list[str]:
    """The issue's goal for MGVQ G=8 (row `g8`): >= single + 1.5 dB, within 1 dB of the AE, 100% usage, rising."""
    seeds = sorted(per_seed)
    if not all(k in per_seed[s] for s in seeds for k in (g8, "single", "ae")):
        return []
    m = {k: float(np.mean([per_seed[s][k]["psnr"] for s in seeds])) for k in (g8, "single", "ae")}
    usage = min(min(per_seed[s][g8]["usage"]) for s in seeds)
    by_k = [per_seed[s][g8]["psnr_by_groups"] for s in seeds]
    rising = all(all(b > a for a, b in zip(v, v[1:])) for v in by_k)
    return [f"{g8}: vs single {m[g8] - m['single']:+.2f} dB (goal >= +1.5), vs AE {m[g8] - m['ae']:+.2f} dB "
            f"(goal >= -1.0), min usage {usage:.3f} (goal 1.0), PSNR strictly rising with groups_to_use in every "
            f"seed: {rising}; AE vs single {m['ae'] - m['single']:+.2f} dB (benchmark sensitivity, goal >= +3)"]


def summary(args, per_seed: dict[int, dict]) -> str:
    return table(args, per_seed) + "\n" + "\n".join(goals(per_seed, "g8") + goals(per_seed, "g8-nested")
                                                     + goals(per_seed, "g8-nested+ft"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                    help=f"rows to run (default {' '.join(DEFAULT_ROWS)}; 'explain' = {' '.join(EXPLAIN_ROWS)})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one process per seed, run in parallel")
    ap.add_argument("--jobs", type=int, default=0, help="seed processes at a time (default: all seeds at once)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--backbone", default="dcae", choices=["dcae", "vqgan"])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 64, 64],
                    help="channel width per resolution level; n levels -> downsample f = 2^(n-1) (default f16)")
    ap.add_argument("--depth", type=int, default=1, help="dcae: blocks per stage (encoder and decoder)")
    ap.add_argument("--total-codes", type=int, default=1024, help="codes per VQ model (K = total / G)")
    ap.add_argument("--reinit-decay", type=float, default=0.1, help="CVQ dead-code EMA rate (reference 0.01)")
    ap.add_argument("--ft-frac", type=float, default=0.25,
                    help="two-stage rows (g8-nested+ft, g8+nested-ft): share of the steps in stage 2")
    ap.add_argument("--num-crops", type=int, default=4096)
    ap.add_argument("--eval-crops", type=int, default=2048)
    ap.add_argument("--zero-shot-dir", default=None,
                    help="zero-shot photos from this folder instead of scikit-image's ZERO_SHOT_PHOTOS (e.g. foolbox's "
                         "ImageNet photos; each is checked not to be a training photo)")
    ap.add_argument("--fashion-mnist-dir", default=None,
                    help="other-domain column: Fashion-MNIST IDX folder (default: the Debian package's folder or the "
                         "cache; nothing is downloaded, the column is skipped with a note when absent)")
    ap.add_argument("--reuse", action="store_true",
                    help="load a row's <out>/seed<N>/<row>/final when it exists instead of training it again (same "
                         "settings assumed): rescore earlier runs, e.g. on new zero-shot sets")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on shared cores)")
    ap.add_argument("--out", default="runs/bench-tokenizer-groups")
    ap.add_argument("--from-results", nargs="+", metavar="RESULTS_JSON",
                    help="train nothing: print the table of earlier runs' results.json files, merged per seed (the rows "
                         "and settings must come from runs with the same settings; --rows picks and orders rows)")
    ap.add_argument("--_json", help=argparse.SUPPRESS)  # internal: a child process writes its seed's results here
    args = ap.parse_args(argv)
    args.rows = [r for name in args.rows for r in (EXPLAIN_ROWS if name == "explain" else [name])]
    unknown = sorted(set(args.rows) - set(rows(args.total_codes)))
    if unknown:
        ap.error(f"unknown rows {unknown}; valid: {sorted(rows(args.total_codes))}")
    if not 0 < args.ft_frac < 1:
        ap.error(f"--ft-frac must be in (0, 1), got {args.ft_frac}")
    if args.from_results:
        per_seed, settings = {}, None
        for f in args.from_results:
            run = json.loads(Path(f).read_text())
            mine = {k: v for k, v in run["args"].items() if k not in ("rows", "seeds", "jobs", "out", "threads",
                                                                       "_json", "from_results", "reuse")}
            diff = [] if settings is None else sorted(k for k in mine.keys() | settings.keys()
                                                      if mine.get(k) != settings.get(k))
            if diff:  # a setting absent from an older results.json counts as None (its default)
                ap.error(f"{f} was run with other settings than {args.from_results[0]}: {diff}")
            settings = mine
            for seed, res in run["results"].items():
                per_seed.setdefault(int(seed), {}).update(res)
        print(summary(argparse.Namespace(**{**vars(args), **settings}), per_seed))
        return 0
    for name in args.rows:
        try:
            row_widths(name, rows(args.total_codes)[name], args.widths)
        except ValueError as e:
            ap.error(str(e))
    t0 = time.time()
    if args._json:  # child
        Path(args._json).write_text(json.dumps(run_seed(args, args.seeds[0])))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(args.seeds) == 1:
        per_seed = {args.seeds[0]: run_seed(args, args.seeds[0])}
    else:
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        jobs = args.jobs or len(args.seeds)
        procs, failed = {}, []
        for i, s in enumerate(args.seeds):
            if i >= jobs:  # wait for the oldest running seed before starting another
                old = args.seeds[i - jobs]
                failed += [old] if procs[old].wait() != 0 else []
            cmd = [sys.executable, __file__, *base, "--seeds", str(s), "--_json", str(out / f"seed{s}.json")]
            procs[s] = subprocess.Popen(cmd, stdout=open(out / f"seed{s}.log", "w"), stderr=subprocess.STDOUT)
        failed += [s for s in args.seeds[max(0, len(args.seeds) - jobs):] if procs[s].wait() != 0]
        if failed:
            raise SystemExit(f"seed(s) {failed} failed; see {out}/seed<N>.log")
        per_seed = {s: json.loads((out / f"seed{s}.json").read_text()) for s in args.seeds}
    minutes = (time.time() - t0) / 60
    text = summary(args, per_seed)
    text += (f"\nwall time {minutes:.1f} min ({len(args.seeds)} process(es), {args.jobs or len(args.seeds)} at a time, "
             f"{args.threads} thread(s) each)")
    print(text)
    sets, notes = zero_shot_sets(args.zero_shot_dir)
    zero_shot = {"sets": {n: sorted(p) for n, p in sets.items()}, "notes": notes,
                 "sizes": zero_shot_sizes(args.image_size),
                 "rule": "centre crop to a square of the short side, PIL bicubic resize to each size"}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": per_seed, "zero_shot": zero_shot,
                                                  "minutes": minutes, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
