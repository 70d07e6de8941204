"""`mgvq train-generator`: stage-two training (generator.train) wired to its tokenizer.

    mgvq train-generator --config configs/generator/tiny.yaml tokenizer=runs/tok/final data=shards/fm out_dir=runs/gen

With `tokenizer=DIR` (a MGVQTokenizer folder; checked against the sha256 the shards' meta.json records):
  - the periodic sample grids are decoded to images (PNG + the trackers) instead of code maps;
  - input_mode=projector takes the tokenizer's codebook (no separate codebook= file needed);
  - at the end `<out_dir>/pipeline` holds a ready MGVQPipeline (class names from the shards' meta.json).
Without it this is exactly `python -m generator.train` (generator/ never imports tokenizer/: the wiring lives here).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from generator import train as gtrain


def train_generator(cfg: gtrain.TrainConfig, tokenizer: str | None = None) -> dict:
    """generator.train.train(cfg) with the tokenizer in `tokenizer` (a folder) decoding samples, supplying the
    projector codebook, and a pipeline folder written at the end. Returns the training summary (+ "pipeline")."""
    if tokenizer is None:
        return gtrain.train(cfg)
    from runtime.fingerprint import check_same_tokenizer
    from tokenizer import MGVQTokenizer

    if cfg.data != "synthetic":
        from generator.data import read_meta

        recorded = (read_meta(cfg.data).get("tokenizer") or {}).get("weights_sha256")
        check_same_tokenizer(tokenizer, recorded, os.path.join(cfg.data, "meta.json"))
    tok = MGVQTokenizer.from_pretrained(tokenizer).eval()
    projector = {**gtrain.PRESETS[cfg.model], **cfg.model_overrides}.get("input_mode") == "projector"
    codebook = tok.codebook() if projector and not cfg.codebook else None

    @torch.no_grad()
    def decode_fn(codes: torch.Tensor) -> torch.Tensor:
        return tok.to(codes.device).decode(codes)

    summary = gtrain.train(cfg, decode_fn=decode_fn, codebook=codebook)
    if "stopped_by" in summary or int(os.environ.get("RANK", "0")) != 0:
        return summary
    metrics = {k: summary[k] for k in ("step", "final_eval_loss", "skipped_steps") if summary.get(k) is not None}
    summary["pipeline"] = write_pipeline(cfg.out_dir, tok.cpu(), cfg.sample_cfg_scale,
                                         summary.get("tokenizer_sha256"), metrics=metrics)
    return summary


def write_pipeline(out_dir: str, tok, guidance_scale: float, tokenizer_sha256: str | None,
                   metrics: dict | None = None) -> str:
    """<out_dir>/pipeline from <out_dir>/final (weights + id2label.json) and the tokenizer."""
    from generator import GPT
    from pipelines import MGVQPipeline

    final = os.path.join(out_dir, "final")
    with open(os.path.join(final, "id2label.json")) as f:
        id2label = {int(k): v for k, v in json.load(f).items()} or None
    pipe = MGVQPipeline(tok, GPT.from_pretrained(final), id2label=id2label,
                        sampling_defaults={"guidance_scale": guidance_scale}, tokenizer_sha256=tokenizer_sha256)
    path = os.path.join(out_dir, "pipeline")
    pipe.save_pretrained(path, metrics=metrics)  # shown in the model card (README.md)
    print(f"pipeline -> {path} (MGVQPipeline.from_pretrained)", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = gtrain.parser(prog="mgvq train-generator")
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--tokenizer", help="MGVQTokenizer folder of the codes (same as tokenizer=DIR): decoded sample "
                                       "grids, projector codebook, and a pipeline folder at the end")
    args = p.parse_intermixed_args(argv)
    tokenizer = args.tokenizer
    rest = []
    for ov in args.overrides:  # tokenizer=DIR is this command's, not a TrainConfig field
        if ov.startswith("tokenizer="):
            tokenizer = ov.split("=", 1)[1]
        else:
            rest.append(ov)
    args.overrides = rest
    cfg = gtrain.config_from_args(args)
    if args.print_config:
        from runtime.config import to_dict

        print(json.dumps({**to_dict(cfg), "tokenizer": tokenizer}, indent=2))
        return 0
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise SystemExit(f"mgvq train-generator: tokenizer={tokenizer!r} is not a folder; valid: a "
                         f"MGVQTokenizer.save_pretrained folder (e.g. runs/tok/final)")
    return 0 if train_generator(cfg, tokenizer) else 1


if __name__ == "__main__":
    sys.exit(main())
