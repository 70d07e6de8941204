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

A user error (a missing path, an unknown class name, an invalid value, a damaged model file) prints one line
`mgvq <verb>: error: ...` and exits with status 2; `--debug` (anywhere on the line) or MGVQ_DEBUG=1 shows the Python
traceback instead. Anything else (a bug, CUDA out of memory) keeps its traceback. `mgvq --version` prints the version.
"""
from __future__ import annotations

import importlib
import os
import sys

VERBS: dict[str, tuple[str, str]] = {
    "train-tokenizer": ("tokenizer.train", "train the MGVQ tokenizer (accelerate; CPU, GPU, DDP)"),
    "cache-codes": ("pipelines.cache_codes", "tokenize an image dataset into `datasets` shards (+ captions / T5 "
                                             "caption features)"),
    "train-generator": ("pipelines.train_generator", "train the class-conditional GPT (accelerate / DeepSpeed ZeRO); "
                                                     "tokenizer=DIR: decoded samples + a pipeline folder"),
    "sample": ("pipelines.sample", "sample images from a saved pipeline"),
    "evaluate-tokenizer": ("pipelines.evaluate_tokenizer", "rFID / PSNR / SSIM / LPIPS of a tokenizer"),
    "evaluate-generation": ("pipelines.evaluate_generation",
                            "sample N images and compute gFID / IS / precision / recall"),
    "compare": ("pipelines.compare", "evaluate several pipelines (e.g. LlamaGen vs MGVQ) with one sampler + "
                                     "evaluator"),
    "convert": ("pipelines.convert", "convert LlamaGen / MGVQ checkpoints to this project's folders"),
    "demo": ("pipelines.demo", "the embedded default: whole system on Fashion-MNIST on a CPU"),
}


# what a user can cause and fix (bad path / value / label, damaged file, full disk); other exceptions are bugs
USER_ERRORS = (ValueError, OSError)


def _usage() -> str:
    lines = ["usage: mgvq [--version] [--debug] <verb> [args...]", "", "verbs:"]
    lines += [f"  {v:<22} {d}" for v, (_, d) in VERBS.items()]
    lines += ["", "Run `mgvq <verb> --help` for the verb's options and an example.",
              "Errors print one line; --debug (or MGVQ_DEBUG=1) shows the traceback."]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("mgvq")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _one_line(verb: str, message: str) -> str:
    """`mgvq <verb>: error: <message>` on one line (a message's own "mgvq <verb>: " / "<verb>: " prefix dropped)."""
    msg = " ".join(str(message).split())
    for prefix in (f"mgvq {verb}:", f"{verb}:", "error:"):
        if msg.startswith(prefix):
            msg = msg[len(prefix):].strip()
    return f"mgvq {verb}: error: {msg or 'failed'}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MGVQ_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    if "--debug" in argv:
        debug = True
        argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("--version", "-V"):
        print(f"mgvq {version()}")
        return 0
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
    try:
        module = importlib.import_module(VERBS[verb][0])
        rc = module.main(rest)
    except SystemExit as e:  # argparse (an int status, its message already printed) or `raise SystemExit("...")`
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        if debug:
            raise
        print(_one_line(verb, e.code), file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if debug:
            raise
        print(_one_line(verb, f"{e}" if str(e) else type(e).__name__), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mgvq {verb}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
