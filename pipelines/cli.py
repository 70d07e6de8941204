"""`mgvq` command line: one verb per stage, each a thin front to a module's `main(argv)`.

    mgvq train-tokenizer --config configs/tokenizer/tiny.yaml
    mgvq cache-codes --tokenizer runs/tok/final --data DIR --out shards/
    mgvq train-generator --config configs/generator/tiny.yaml
    mgvq sample --pipeline runs/pipe --labels 0 1 2 --out samples.png
    mgvq evaluate-tokenizer ... | mgvq evaluate-generation ...
    mgvq compare --pipeline llamagen=DIR --pipeline mgvq=DIR --ref REF.npz --out runs/compare
    mgvq convert --from {llamagen-vq,llamagen-gpt,mgvq-tokenizer,mgvq-gpt} CHECKPOINT OUT_DIR [key=value ...]
    mgvq demo [--quick]

Each verb's `--help` shows a working example. Modules are imported lazily so `mgvq --help` is instant.
"""
from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "train-tokenizer": ("tokenizer.train", "train the MGVQ tokenizer (accelerate; CPU, GPU, DDP)"),
    "cache-codes": ("tokenizer.cache_codes", "tokenize an image dataset into `datasets` shards"),
    "train-generator": ("generator.train", "train the class-conditional GPT (accelerate / DeepSpeed ZeRO)"),
    "sample": ("pipelines.sample", "sample images from a saved pipeline"),
    "evaluate-tokenizer": ("evaluation.reconstruct", "rFID / PSNR / SSIM / LPIPS of a tokenizer"),
    "evaluate-generation": ("evaluation.sample", "sample N images and compute gFID / IS / precision / recall"),
    "compare": ("evaluation.compare", "evaluate several pipelines (e.g. LlamaGen vs MGVQ) with one sampler + evaluator"),
    "convert": ("pipelines.convert", "convert LlamaGen / MGVQ checkpoints to this project's folders"),
    "demo": ("pipelines.demo", "the embedded default: whole system on Fashion-MNIST on a CPU"),
}


def _usage() -> str:
    lines = ["usage: mgvq <verb> [args...]", "", "verbs:"]
    lines += [f"  {v:<22} {d}" for v, (_, d) in VERBS.items()]
    lines += ["", "Run `mgvq <verb> --help` for the verb's options and an example."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, VERBS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"mgvq: unknown verb {verb!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
