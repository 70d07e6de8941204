"""`mgvq evaluate-generation`: sample N class-balanced images from a pipeline (sharded with accelerate, resumable),
write PNGs + an ADM npz, and compute FID / sFID / IS / precision / recall.

    python -m pipelines.evaluate_generation --pipeline runs/pipe --num-images 50000 --batch-size 32 \\
        --guidance-scale 2.0 --resize-to 256 --ref VIRTUAL_imagenet256_labeled.npz --out runs/eval_cfg2
    accelerate launch --num_processes 8 -m pipelines.evaluate_generation ...    # sharded over 8 processes
    mgvq evaluate-generation ...                                                  # the same command

evaluation/sample.py does the work (protocol there: class-balanced labels, one seed and one generator per image, fixed
batches sharded over processes, atomic PNGs, resumable); this module loads the pipeline and hands evaluation its
`sample_fn` (evaluation never imports the pipelines). `evaluate_generation(...)` is the same with keyword arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from evaluation import metrics as M
from evaluation.sample import Dist, evaluate_samples, format_table, generate_samples
from runtime.cli_args import add_sampling_args, check_sampling_args, pipeline_layout
from runtime.outdir import check_output_dir

PROG = "evaluate-generation"
TABLE_KEYS = ("num_images", "fid", "sfid", "inception_score", "inception_score_std", "precision", "recall",
              "num_ref_images", "images_per_s")
TABLE_KEYS_CLASSIFIER = ("num_images", "fd", "accuracy", "classifier_score", "classifier_score_std", "precision",
                         "recall", "num_ref_images", "images_per_s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgvq evaluate-generation",
        description="Sample N class-balanced images from a pipeline (sharded with accelerate, resumable), write "
                    "PNGs + an ADM npz, and compute FID / IS / precision / recall.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # 50k samples at 384 resized to 256, vs ADM's reference batch, on 8 GPUs\n"
               "  accelerate launch --num_processes 8 -m pipelines.evaluate_generation --pipeline runs/pipe \\\n"
               "      --num-images 50000 --batch-size 32 --guidance-scale 2.0 --resize-to 256 \\\n"
               "      --ref VIRTUAL_imagenet256_labeled.npz \\\n"
               "      --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/eval_cfg2\n"
               "  # CPU smoke test of the demo pipeline against an image folder\n"
               "  mgvq evaluate-generation --pipeline runs/demo/pipeline --num-images 100 --batch-size 50 \\\n"
               "      --ref data/fmnist_ref_pngs --inception-weights inc.pth --out runs/demo/eval\n"
               "  # score with the demo's Fashion-MNIST classifier instead of Inception (FD in its feature space,\n"
               "  # conditional accuracy, classifier score, precision / recall); ref = real images (npz or folder)\n"
               "  mgvq evaluate-generation --pipeline runs/demo/pipeline --num-images 2000 --batch-size 250 \\\n"
               "      --feature-net runs/demo/classifier --ref fmnist_test.npz --out runs/demo/eval_clf\n"
               "  # evaluate an existing ADM npz (e.g. a released sample file) without sampling\n"
               "  mgvq evaluate-generation --samples GPT_XXL_300ep_topk_12.npz \\\n"
               "      --ref VIRTUAL_imagenet256_labeled.npz \\\n"
               "      --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/eval_released\n"
               "Outputs in --out: images/NNNNNN.png, samples.npz (arr_0 uint8 NHWC), metrics.json.\n"
               "For paper-comparable numbers also run ADM's evaluator on samples.npz (see evaluation/__init__.py).")
    p.add_argument("--pipeline", help="MGVQPipeline folder (save_pretrained) to sample from")
    p.add_argument("--samples", help="evaluate this existing ADM npz (arr_0 uint8 NHWC) instead of sampling")
    p.add_argument("--out", required=True, help="output folder (PNGs, samples.npz, metrics.json); reruns resume")
    p.add_argument("--num-images", type=int, default=50000, help="number of samples N (default 50000)")
    p.add_argument("--num-classes", type=int, help="classes to balance over (default: the generator's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per sampler call per process (default 32)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the pipeline's)")
    add_sampling_args(p, default_note=" (default: the pipeline's)")  # one value or one per sub-codebook
    p.add_argument("--cfg-interval", type=int, help="CFG interval (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; image i has seed+i (its own generator: the same image whatever the batch size "
                        "or the number of processes)")
    p.add_argument("--resize-to", type=int, help="resize samples to this size, bicubic on the float tensor (e.g. 256)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="generator dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays off on GPUs)")
    p.add_argument("--ref", help="reference: ADM npz (mu/sigma and/or arr_0) or an image folder; omit to only sample")
    p.add_argument("--inception-weights", default="auto",
                   help=f"path of {M.INCEPTION_WEIGHTS_NAME}, or 'auto' (default): $TORCH_HOME/hub/checkpoints/, "
                        f"downloaded there when online; otherwise the error names the URL and the destination")
    p.add_argument("--feature-net", default="inception",
                   help="what scores the samples: 'inception' (default: FID / sFID / IS) or a classifier folder of the "
                        "generator's classes written by pipelines.classifier.save_classifier, e.g. the demo's "
                        "runs/demo/classifier (Frechet distance 'fd' in its feature space, conditional 'accuracy', "
                        "'classifier_score', precision / recall; --inception-weights is then unused)")
    p.add_argument("--eval-batch-size", type=int, default=100, help="feature-net batch size (default 100)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Every setting checked before anything is loaded or sampled: one SystemExit naming the flag, value, valid
    range."""
    def bad(flag, value, valid):
        raise SystemExit(f"{PROG}: {flag}={value!r} is invalid; valid: {valid}")

    if (args.pipeline is None) == (args.samples is None):
        raise SystemExit(f"{PROG}: pass exactly one of --pipeline DIR (sample) or --samples NPZ (evaluate)")
    for flag, v in (("--num-images", args.num_images), ("--batch-size", args.batch_size),
                    ("--eval-batch-size", args.eval_batch_size), ("--num-classes", args.num_classes),
                    ("--resize-to", args.resize_to)):
        if v is not None and v < 1:
            bad(flag, v, "an integer >= 1")
    if args.guidance_scale is not None and not 0 <= args.guidance_scale < float("inf"):  # NaN / inf too
        bad("--guidance-scale", args.guidance_scale, "a finite number >= 0 (1.0 = no guidance)")
    # --temperature / --top-k / --top-p values were checked when parsed; their count (one or G) and top-k <= K here
    layout = pipeline_layout(args.pipeline) if args.pipeline is not None else None
    if layout is not None:
        check_sampling_args(dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p), *layout,
                            prog=PROG)
    if args.seed < 0:
        bad("--seed", args.seed, ">= 0")


def settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `evaluate_generation` from parsed flags."""
    return {k: v for k, v in vars(args).items()}


def load_feature_net(feature_net: str | None, inception_weights: str | None, batch_size: int, device):
    """'inception' / None -> metrics.InceptionFeatures(inception_weights); a classifier folder -> ClassifierFeatures."""
    if feature_net in (None, "inception"):
        return M.InceptionFeatures(inception_weights, batch_size=batch_size, device=device)
    from pipelines.classifier import CONFIG_NAME as CLF_CONFIG, WEIGHTS_NAME as CLF_WEIGHTS, ClassifierFeatures

    folder = Path(feature_net)
    if not (folder / CLF_CONFIG).is_file() or not (folder / CLF_WEIGHTS).is_file():
        raise FileNotFoundError(f"{PROG}: --feature-net={feature_net!r} is invalid; valid: 'inception', or a classifier "
                                f"folder holding {CLF_CONFIG} + {CLF_WEIGHTS} (pipelines.classifier.save_classifier, "
                                f"e.g. the demo's runs/demo/classifier)")
    return ClassifierFeatures.from_folder(str(folder), device=device, batch_size=batch_size)


def _sample(pipeline: str, out: Path, num_images: int, num_classes: int | None, batch_size: int, seed: int,
            resize_to: int | None, dtype: str, compile: bool, sampling: dict) -> tuple[Path, dict] | None:
    """Load the pipeline, check the settings, sample into `out`; (npz, settings) on the main process, else None.
    settings["timing"] = {"images", "seconds"} spent in the sampler by this call (0 images when all existed)."""
    from pipelines import MGVQPipeline

    dist = Dist()
    pipe = MGVQPipeline.from_pretrained(pipeline, device=dist.device, dtype=getattr(torch, dtype))
    n_cls = pipe.generator.config.num_classes
    num_classes = num_classes or n_cls
    if num_classes > n_cls:
        raise ValueError(f"{PROG}: --num-classes={num_classes} is invalid; valid: 1..{n_cls} (the generator's classes)")
    size = resize_to or pipe.image_size
    check_output_dir(out, need_bytes=num_images * size * size * 3, what="--out")  # samples.npz (uncompressed)
    given = {k: v for k, v in sampling.items() if v is not None}
    resolved = pipe.sampling_settings([num_classes - 1], **given)  # checked before sampling
    config = {"pipeline": str(Path(pipeline).resolve()), "dtype": dtype,
              **{k: resolved[k] for k in ("guidance_scale", "temperature", "top_k", "top_p", "cfg_interval")}}
    if dist.rank == 0:
        print(f"sampling {num_images} images, {num_classes} classes, {dist.world_size} process(es): "
              f"{json.dumps(config)}", flush=True)
    timing = {"images": 0, "seconds": 0.0}
    npz = generate_samples(pipe.sample_fn(compile=compile, **given), out, num_images, num_classes, batch_size, seed,
                           resize_to, config=config, dist=dist, timing=timing)
    return (npz, {**config, "timing": timing}) if dist.rank == 0 else None


def evaluate_generation(*, out: str, pipeline: str | None = None, samples: str | None = None,
                        num_images: int = 50000, num_classes: int | None = None, batch_size: int = 32,
                        guidance_scale: float | None = None, temperature=None, top_k=None, top_p=None,
                        cfg_interval: int | None = None, seed: int = 0, resize_to: int | None = None,
                        dtype: str = "float32", compile: bool = False, ref: str | None = None,
                        inception_weights: str | None = "auto", eval_batch_size: int = 100,
                        feature_net: str | None = "inception") -> dict | None:
    """Sample from `pipeline` (or take the ADM npz `samples`) into `out` and, with `ref`, compute the metrics
    (returned and written to out/metrics.json). Settings as the command line's flags; None sampling settings use the
    pipeline's defaults; `feature_net` 'inception' or a classifier folder (see --feature-net). Returns None on
    non-main processes and without `ref`."""
    out = Path(out)
    check_output_dir(out, what="--out")  # an unwritable --out or a full disk fails now, not after the sampling
    inception = None
    if ref is not None and int(os.environ.get("RANK", "0")) == 0:  # fail on missing weights before hours of sampling
        inception = load_feature_net(feature_net, inception_weights, eval_batch_size,
                                     "cuda" if torch.cuda.is_available() else "cpu")
    for flag, path, what in (("--pipeline", pipeline, "pipeline folder"), ("--samples", samples, "ADM .npz"),
                             ("--ref", ref, "ADM .npz or image folder")):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{PROG}: {flag}={path!r} does not exist; expected a {what}")
    if pipeline is not None:
        done = _sample(pipeline, out, num_images, num_classes, batch_size, seed, resize_to, dtype, compile,
                       dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                            cfg_interval=cfg_interval))
        if done is None:
            return None
        npz, config = done
        timing = config.pop("timing")
    else:
        timing = {"images": 0, "seconds": 0.0}
        npz, config = Path(samples), {"samples": str(Path(samples).resolve())}
    if ref is None:
        print(f"wrote {npz}; no --ref given, so no metrics")
        return None
    t0 = time.time()
    res = evaluate_samples(npz, ref, inception, cache_dir=out, batch_size=eval_batch_size)
    if timing["images"]:  # the sampler's speed in this call (generation + decode, this process)
        res.update(images_per_s=timing["images"] / timing["seconds"], sampling_seconds=round(timing["seconds"], 2))
    else:  # everything was sampled by an earlier call: keep its measurement
        old = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        res.update(images_per_s=old.get("images_per_s"), sampling_seconds=old.get("sampling_seconds"))
    res.update(samples=str(npz), ref=str(ref), eval_seconds=round(time.time() - t0, 1), settings=config)
    if res["feature_net"] == "inception-v3-compat":
        res["inception_weights"] = str(inception.weights_path)
    (out / "metrics.json").write_text(json.dumps(res, indent=2))
    keys = TABLE_KEYS if "fid" in res else TABLE_KEYS_CLASSIFIER
    print(format_table({k: res.get(k) for k in keys}))
    print(f"wrote {out / 'metrics.json'}")
    return res


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    validate_args(args)
    evaluate_generation(**settings(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
