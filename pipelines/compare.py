"""`mgvq compare`: evaluate several pipelines (e.g. an imported LlamaGen pair and an MGVQ pipeline) with the SAME
sampler settings, seeds, class-balanced labels, reference and evaluator, and print one table.

Example (ImageNet 256, 50k samples each, LlamaGen's evaluation settings):
    mgvq convert --from llamagen-vq vq_ds16_c2i.pt w/llamagen-vq16
    mgvq convert --from llamagen-gpt c2i_L_256.pt w/llamagen-gpt-l
    mgvq convert --from pipeline w/llamagen-vq16 w/llamagen-gpt-l w/llamagen-l --labels imagenet
    accelerate launch -m pipelines.compare --pipeline llamagen-L=w/llamagen-l --pipeline mgvq-L=runs/mgvq-l/pipeline \\
        --num-images 50000 --guidance-scale 2.0 --top-k 0 --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/compare

--top-k / --top-p / --temperature take one value or one per sub-codebook (`--top-k 4096,4096,2048,1024`); a list
must fit every pipeline's G. top-k counts codes (MGVQ's sample_c2i.py `--top-k 12` is log2: `--top-k 4096` here).

Each pipeline gets its own resumable sub-folder `--out/NAME` (PNGs, samples.npz, metrics.json); the table is also
written to `--out/compare.json`. All other options are those of `mgvq evaluate-generation` and apply to every pipeline, `--feature-net` among them:
`--feature-net runs/demo/classifier --ref fmnist_test.npz` scores every pipeline with the demo's classifier (FD in its
feature space, conditional accuracy, classifier score, precision / recall) instead of Inception
(bench/llamagen_vs_mgvq.py compares LlamaGen's and MGVQ's layouts this way).
`compare(pipelines={name: dir}, out=..., **settings)` is the same with keyword arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evaluation.compare import columns_for, format_compare
from pipelines import evaluate_generation as EG


def compare(*, pipelines: dict[str, str], out: str, **settings) -> dict | None:
    """evaluate_generation(pipeline=DIR, out=out/NAME, **settings) for each NAME=DIR with the same settings; the
    table -> out/compare.json (returned on the main process, None elsewhere)."""
    out = Path(out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    table = {}
    for name, path in pipelines.items():
        res = EG.evaluate_generation(pipeline=path, out=str(out / name), **settings)
        if rank0:
            m = out / name / "metrics.json"
            table[name] = res or (json.loads(m.read_text()) if m.exists() else {})
    if not rank0:
        return None
    first = next(iter(pipelines))
    shared = {k: v for k, v in (table[first].get("settings") or {}).items() if k != "pipeline"}
    columns = columns_for(table[first])
    rows = {n: {c: table[n].get(c) for c in columns} for n in pipelines}
    (out / "compare.json").write_text(json.dumps({"settings": shared, "results": rows}, indent=2))
    print(format_compare(rows, columns))
    print(f"settings: {json.dumps(shared)}\nwrote {out / 'compare.json'}")
    return {"settings": shared, "results": rows}


def _runs(specs: list[str]) -> dict[str, str]:
    runs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--pipeline {spec!r}: expected NAME=DIR")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SystemExit(f"--pipeline {spec!r}: NAME may hold letters, digits, '-', '_', '.'")
        if name in runs:
            raise SystemExit("--pipeline names must be unique")
        runs[name] = path
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="mgvq compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True)
    p.add_argument("--pipeline", action="append", required=True, metavar="NAME=DIR",
                   help="a pipeline to evaluate; repeat for each (NAME is the table's row label)")
    p.add_argument("--out", required=True)
    args, rest = p.parse_known_args(argv)
    runs = _runs(args.pipeline)
    # every pipeline's settings are checked before the first one samples (one value or one per sub-codebook each)
    shared = EG.parser().parse_args(["--pipeline", next(iter(runs.values())), "--out", args.out, *rest])
    for name, path in runs.items():
        shared.pipeline = path
        try:
            EG.validate_args(shared)
        except SystemExit as e:
            raise SystemExit(f"compare --pipeline {name}={path}: {e}") from None
    settings = {k: v for k, v in EG.settings(shared).items() if k not in ("pipeline", "out", "samples")}
    compare(pipelines=runs, out=args.out, **settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
