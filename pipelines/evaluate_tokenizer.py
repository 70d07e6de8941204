"""`mgvq evaluate-tokenizer`: reconstruction metrics of a tokenizer on an image folder: PSNR (both conventions), SSIM,
LPIPS, rFID, per-group codebook usage, coarse-to-fine PSNR, best/worst examples.

    python -m pipelines.evaluate_tokenizer --tokenizer runs/tok/final --data imagenet/val --resolution 256 \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/tok/eval256
    mgvq evaluate-tokenizer ...                                                  # the same command

evaluation/reconstruct.py does the work on callables (protocol there); this module loads the tokenizer and LPIPS and
hands evaluation their encode / decode / distance functions. `evaluate_tokenizer(...)` takes keyword arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from evaluation import metrics as M
from evaluation.reconstruct import evaluate_reconstruction, format_table, parse_resolution
from runtime.outdir import check_output_dir

PROG = "evaluate-tokenizer"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgvq evaluate-tokenizer",
        description="Reconstruction metrics of a tokenizer on an image folder: PSNR (both conventions), SSIM, LPIPS, "
                    "rFID, per-group codebook usage, coarse-to-fine PSNR, best/worst examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # ImageNet-val 256 (LlamaGen/MGVQ table), with rFID and LPIPS\n"
               "  mgvq evaluate-tokenizer --tokenizer runs/tok/final --data imagenet/val --resolution 256 \\\n"
               "      --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/tok/eval256\n"
               "  # quick CPU check on 8 scikit-image photos at 64 px (no rFID without weights)\n"
               "  mgvq evaluate-tokenizer --tokenizer runs/demo/pipeline/tokenizer --data photos/ --resolution 64 \\\n"
               "      --max-images 8 --out runs/demo/recon\n"
               "Outputs in --out: metrics.json, examples/{worst,best}_*.png (original | reconstruction).\n"
               "LPIPS uses tokenizer.lpips weights (`python -m tokenizer.lpips fetch`); skipped with a note if absent.")
    p.add_argument("--tokenizer", required=True, help="MGVQTokenizer folder (save_pretrained)")
    p.add_argument("--data", required=True, help="image folder (searched recursively)")
    p.add_argument("--resolution", default="256", help="256, 512, 2k (2560x1440), N or WxH (default 256)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (sorted by path)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--inception-weights", help=f"{M.INCEPTION_WEIGHTS_NAME} for rFID (default: "
                                               f"$TORCH_HOME/hub/checkpoints/ if present, else rFID is skipped)")
    p.add_argument("--lpips-weights-dir", help="folder with vgg16.safetensors (tokenizer.lpips); default its cache dir")
    p.add_argument("--no-coarse-to-fine", action="store_true", help="skip PSNR per groups_to_use=1..G")
    p.add_argument("--num-examples", type=int, default=4, help="best / worst side-by-side PNGs each (default 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _lpips(weights_dir: str | None, device: str):
    """LPIPS-VGG as a distance function, or None (with a note) when its weights are not there."""
    from tokenizer.lpips import load_lpips

    try:
        lp = load_lpips("vgg", weights_dir=weights_dir, fetch=False).to(device)
    except FileNotFoundError as e:
        if weights_dir is not None:
            raise
        print(f"LPIPS skipped: {e}")
        return None
    return lambda x, y: lp(x, y)


def evaluate_tokenizer(*, tokenizer: str, data: str, out: str, resolution: str = "256", max_images: int | None = None,
                       batch_size: int = 16, inception_weights: str | None = None,
                       lpips_weights_dir: str | None = None, coarse_to_fine: bool = True, num_examples: int = 4,
                       device: str = "cpu") -> dict:
    """Reconstruction metrics of the tokenizer folder `tokenizer` on the images in `data` (out/metrics.json)."""
    size = parse_resolution(resolution)
    for flag, v, low in (("--batch-size", batch_size, 1), ("--max-images", max_images, 1),
                         ("--num-examples", num_examples, 0)):
        if v is not None and v < low:
            raise ValueError(f"{PROG}: {flag}={v!r} is invalid; valid: an integer >= {low}")
    out = Path(out)
    check_output_dir(out, what="--out")  # an unwritable --out or a full disk fails now, not after the evaluation
    images = M.ImageFolder(data, size=size, max_images=max_images)
    inception = None
    if inception_weights is not None or M.default_inception_weights_path().is_file():
        inception = M.InceptionFeatures(inception_weights, device=device, batch_size=batch_size)
    else:
        print(f"rFID skipped: no --inception-weights and no {M.default_inception_weights_path()}")
    from tokenizer import MGVQTokenizer

    tok = MGVQTokenizer.from_pretrained(tokenizer, device=device).eval()
    lpips_fn = _lpips(lpips_weights_dir, device)
    if tok.is_quantized:
        enc, dec, groups = tok.encode, (lambda idx, g: tok.decode(idx, groups_to_use=g)), tok.config.groups
    else:  # continuous baseline (quantizer none / kl): its latent, no indices, usage or coarse-to-fine
        enc, dec, groups = tok.encode_latent, (lambda z, g: tok.decode_latent(z)), 0
    res = evaluate_reconstruction(enc, dec, images, groups=groups, codebook_size=tok.config.codebook_size,
                                  lpips_fn=lpips_fn, inception=inception, batch_size=batch_size,
                                  coarse_to_fine=coarse_to_fine, num_examples=num_examples, out_dir=out, device=device)
    res.update(tokenizer=str(Path(tokenizer).resolve()), quantizer=tok.config.quantizer, data=str(Path(data).resolve()),
               inception_weights=None if inception is None else str(inception.weights_path),
               lpips_net="vgg" if lpips_fn else None)
    (out / "metrics.json").write_text(json.dumps(res, indent=2))
    print(format_table(res))
    print(f"wrote {out / 'metrics.json'}")
    return res


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        evaluate_tokenizer(tokenizer=a.tokenizer, data=a.data, out=a.out, resolution=a.resolution,
                           max_images=a.max_images, batch_size=a.batch_size, inception_weights=a.inception_weights,
                           lpips_weights_dir=a.lpips_weights_dir, coarse_to_fine=not a.no_coarse_to_fine,
                           num_examples=a.num_examples, device=a.device)
    except ValueError as e:
        if str(e).startswith(f"{PROG}: --"):  # a bad flag value: a command-line error
            raise SystemExit(str(e)) from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
