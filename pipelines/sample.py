"""`mgvq sample`: class-conditional samples from a saved pipeline, as a PNG grid and/or one PNG per image.

Examples:
    mgvq sample --pipeline runs/demo/pipeline --labels sneaker bag 3 --n 4 --guidance-scale 4 --out samples.png
    # one top-k per sub-codebook (G=4); MGVQ's sample_c2i.py `--top-k 12` (log2) is `--top-k 4096` here
    mgvq sample --pipeline weights/mgvq-xxl --labels 207 --top-k 4096,4096,2048,1024 --temperature 1.0 --out s.png
    # a text-conditional pipeline (mgvq demo --text): prompts instead of labels
    mgvq sample --pipeline runs/demo-text/pipeline --prompt "a black ankle boot" "a bag" --n 4 --out samples.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from runtime.cli_args import add_sampling_args, check_sampling_args, pipeline_layout


def _finite(text: str) -> float:  # a finite float (`--guidance-scale nan` stops here, not in the sampler)
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; give a finite number")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mgvq sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="pipeline folder (MGVQPipeline.save_pretrained) or hub id")
    p.add_argument("--labels", nargs="+", help="class ids or class names (class-conditional pipelines)")
    p.add_argument("--prompt", nargs="+", help="captions (text-conditional pipelines), one image row each")
    p.add_argument("--negative-prompt", default=None, help="caption for the uncond half of CFG (text pipelines; "
                                                           "default: the generator's null caption)")
    p.add_argument("--n", type=int, default=1, help="images per label")
    p.add_argument("--guidance-scale", type=_finite, default=None, help="CFG scale >= 0 (default: the pipeline's)")
    add_sampling_args(p, default_note=" (default: the pipeline's)")
    p.add_argument("--cfg-interval", type=int, default=None)
    p.add_argument("--groups-to-use", type=int, default=None, help="decode from the first k groups only")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None, help="(default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="image i is seeded by draw i of this seed, so an image does "
                                                      "not change with the other labels or --batch-size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="generator dtype (bfloat16 / float16: faster on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays off on GPUs)")
    p.add_argument("--out", default="samples.png", help="grid PNG path; a folder gets one PNG per image")
    a = p.parse_args(argv)
    if bool(a.labels) == bool(a.prompt):
        p.error("give --labels (class-conditional pipelines) or --prompt (text-conditional ones)")
    if a.n < 1:
        p.error(f"--n={a.n} is invalid: images per label must be >= 1")

    from torchvision.utils import save_image

    from pipelines import MGVQPipeline
    from runtime.outdir import check_output_dir

    # an unwritable --out fails before the model is loaded and sampled
    check_output_dir((os.path.dirname(a.out) or ".") if a.out.endswith(".png") else a.out, what="--out")
    layout = pipeline_layout(a.pipeline)  # per-group counts checked before the model is loaded
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    if layout is not None:
        check_sampling_args(sampling, *layout, prog="mgvq sample")

    pipe = MGVQPipeline.from_pretrained(a.pipeline).to(a.device, getattr(torch, a.dtype))
    if layout is None:  # a hub id: checked once the config is here
        check_sampling_args(sampling, pipe.generator.config.groups, pipe.generator.config.codebook_size,
                            prog="mgvq sample")
    labels = [int(l) if l.lstrip("-").isdigit() else l for l in a.labels] if a.labels else None
    text = dict(prompt=a.prompt, negative_prompt=a.negative_prompt) if a.prompt else {}
    g = torch.Generator(a.device).manual_seed(a.seed)
    out = pipe(labels, **text, guidance_scale=a.guidance_scale, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
               cfg_interval=a.cfg_interval, groups_to_use=a.groups_to_use, num_images_per_label=a.n,
               cfg_schedule=a.cfg_schedule, batch_size=a.batch_size, generator=g, output_type="pt", compile=a.compile)
    if a.out.endswith(".png"):
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        save_image(out.images, a.out, nrow=a.n if a.n > 1 else min(len(labels or a.prompt), 10))
        print(f"wrote {len(out.images)} samples to {a.out}")
    else:
        os.makedirs(a.out, exist_ok=True)
        for i, img in enumerate(out.images):
            save_image(img, os.path.join(a.out, f"{i:06d}.png"))
        print(f"wrote {len(out.images)} PNGs to {a.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
