"""`mgvq compare`: evaluate several pipelines (e.g. an imported LlamaGen pair and an MGVQ pipeline) with the SAME
sampler settings, seeds, class-balanced labels, reference and evaluator, and print one table.

Example (ImageNet 256, 50k samples each, LlamaGen's evaluation settings):
    mgvq convert --from llamagen-vq vq_ds16_c2i.pt w/llamagen-vq16
    mgvq convert --from llamagen-gpt c2i_L_256.pt w/llamagen-gpt-l
    mgvq convert --from pipeline w/llamagen-vq16 w/llamagen-gpt-l w/llamagen-l --labels imagenet
    accelerate launch -m evaluation.compare --pipeline llamagen-L=w/llamagen-l --pipeline mgvq-L=runs/mgvq-l/pipeline \\
        --num-images 50000 --guidance-scale 2.0 --top-k 0 --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/compare

--top-k / --top-p / --temperature take one value or one per sub-codebook (`--top-k 4096,4096,2048,1024`); a list
must fit every pipeline's G. top-k counts codes (MGVQ's sample_c2i.py `--top-k 12` is log2: `--top-k 4096` here).

Each pipeline gets its own resumable sub-folder `--out/NAME` (PNGs, samples.npz, metrics.json); the table is also
written to `--out/compare.json`. All other options are those of `mgvq evaluate-generation` and apply to every pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evaluation import sample as S

COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "num_images")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="mgvq compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True)
    p.add_argument("--pipeline", action="append", required=True, metavar="NAME=DIR",
                   help="a pipeline to evaluate; repeat for each (NAME is the table's row label)")
    p.add_argument("--out", required=True)
    args, rest = p.parse_known_args(argv)
    runs = []
    for spec in args.pipeline:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--pipeline {spec!r}: expected NAME=DIR")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SystemExit(f"--pipeline {spec!r}: NAME may hold letters, digits, '-', '_', '.'")
        runs.append((name, path))
    if len({n for n, _ in runs}) != len(runs):
        raise SystemExit("--pipeline names must be unique")
    # every pipeline's settings are checked before the first one samples (one value or one per sub-codebook each)
    shared = S._parser().parse_args(["--pipeline", runs[0][1], "--out", args.out, *rest])
    for name, path in runs:
        shared.pipeline = path
        try:
            S.validate_args(shared)
        except SystemExit as e:
            raise SystemExit(f"compare --pipeline {name}={path}: {e}") from None
    out = Path(args.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    table = {}
    for name, path in runs:
        rc = S.main(["--pipeline", path, "--out", str(out / name), *rest])
        if rc:
            return rc
        if rank0:
            m = out / name / "metrics.json"
            table[name] = json.loads(m.read_text()) if m.exists() else {}
    if not rank0:
        return 0
    settings = {k: v for k, v in (table[runs[0][0]].get("settings") or {}).items() if k != "pipeline"}
    rows = {n: {c: table[n].get(c) for c in COLUMNS} for n, _ in runs}
    (out / "compare.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
    print(format_compare(rows))
    print(f"settings: {json.dumps(settings)}\nwrote {out / 'compare.json'}")
    return 0


def format_compare(rows: dict[str, dict]) -> str:
    w = max(8, *(len(n) for n in rows))
    head = f"{'pipeline':<{w}}  " + "  ".join(f"{c:>15}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for n, r in rows.items():
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append(f"{'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v):>15}")
        lines.append(f"{n:<{w}}  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
