r"""`mgvq convert --from KIND CHECKPOINT OUT_DIR [key=value ...]`: third-party checkpoints -> this project's folders.

Kinds:
  llamagen-vq     LlamaGen VQ-16 / VQ-8 tokenizer (.pt, weights under "model"/"ema"/"state_dict" or bare)
  mgvq-tokenizer  released MGVQ tokenizers (mgvq_f{8,16,32}c32_g{4,8}[_mix].pt, weights under "model")
  llamagen-gpt    LlamaGen c2i GPT (c2i_B_256.pt ...; give n_head= and grid= when the weights cannot tell)
  llamagen-gpt-t2i LlamaGen t2i GPT (t2i_XL_stage1_256.pt ...): text-conditional, caption width / token count from
                  the weights; sample with T5 caption features (pipelines.text_encoder)
  mgvq-gpt        released MGVQ GPT (needs --tokenizer DIR: its input projector reads the tokenizer's raw codebook)
  pipeline        assemble converted (or trained) TOKENIZER_DIR + GENERATOR_DIR into a pipeline folder that
                  MGVQPipeline.from_pretrained loads: --from pipeline TOKENIZER_DIR GENERATOR_DIR OUT_DIR
                  [--labels imagenet|FILE.json|FILE.txt] [--codes SHARDS_DIR] [guidance_scale=.. top_k=.. ...]
                  Refuses a tokenizer whose weights' sha256 differs from the one that made the generator's codes
                  (recorded by generator.train in GENERATOR_DIR/train_summary.json, or SHARDS_DIR/meta.json).

Examples:
  mgvq convert --from llamagen-vq vq_ds16_c2i.pt weights/llamagen-vq16
  mgvq convert --from llamagen-gpt c2i_L_256.pt weights/llamagen-gpt-l grid=16
  mgvq convert --from mgvq-tokenizer mgvq_f16c32_g4.pt weights/mgvq-f16-g4
  mgvq convert --from mgvq-gpt MGVQ_GPT_XXL.pt weights/mgvq-gpt-xxl --tokenizer weights/mgvq-f16-g4 grid=24
  mgvq convert --from pipeline weights/llamagen-vq16 weights/llamagen-gpt-l pipelines/llamagen-l --labels imagenet \
      guidance_scale=2.0
  mgvq convert --from pipeline weights/mgvq-f16-g4 weights/mgvq-gpt-xxl pipelines/mgvq-xxl --labels imagenet \
      top_k=4096
  (MGVQ's sample_c2i.py takes top-k as log2: its `--top-k 12` keeps 2**12 codes per sub-codebook, top_k=4096 here;
  a per-group default is a YAML list: top_k=[4096,4096,2048,1024].)

Checkpoints are read with torch.load(weights_only=True) (or safetensors); nothing in them is executed.
"""
from __future__ import annotations

import importlib
import sys

KINDS = {
    "llamagen-vq": "tokenizer.convert",
    "mgvq-tokenizer": "tokenizer.convert_mgvq",
    "llamagen-gpt": "generator.convert",
    "llamagen-gpt-t2i": "generator.convert",
    "mgvq-gpt": "generator.convert",
    "pipeline": "pipelines.convert",
}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (shipped with torchvision; no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_labels(spec: str | None, num_classes: int) -> list[str] | None:
    import json
    import os

    if spec is None:
        return imagenet_class_names() if num_classes == 1000 else None
    if spec == "imagenet":
        names = imagenet_class_names()
    elif os.path.isfile(spec) and spec.endswith(".json"):
        with open(spec) as f:
            obj = json.load(f)
        names = [obj[str(i)] for i in range(len(obj))] if isinstance(obj, dict) else list(obj)
    elif os.path.isfile(spec):
        with open(spec) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        raise SystemExit(f"--labels {spec!r}: give 'imagenet', a JSON list/dict file or a text file with one name a line")
    if len(names) != num_classes:
        raise SystemExit(f"--labels {spec!r} has {len(names)} names but the generator has {num_classes} classes")
    return names


def recorded_tokenizer_sha256(gen_dir: str, codes_dir: str | None = None) -> tuple[str | None, str]:
    """(sha256 of the tokenizer that made the generator's training codes, where it was recorded) or (None, "").

    Read from CODES_DIR/meta.json (`tokenizer.weights_sha256`) when --codes is given, else from the generator
    folder: train_summary.json `tokenizer_sha256` (generator.train writes it), else a pipeline folder's
    pipeline_config.json `tokenizer_sha256` one level up (GENERATOR_DIR = PIPELINE/generator)."""
    import json
    import os

    if codes_dir is not None:
        meta = os.path.join(codes_dir, "meta.json")
        if not os.path.isfile(meta):
            raise SystemExit(f"--codes {codes_dir}: no meta.json (a `mgvq cache-codes` output folder has one)")
        with open(meta) as f:
            sha = (json.load(f).get("tokenizer") or {}).get("weights_sha256")
        if not sha:
            raise SystemExit(f"--codes {codes_dir}: meta.json records no tokenizer.weights_sha256")
        return sha, f"{meta} (tokenizer.weights_sha256)"
    for path, key in ((os.path.join(gen_dir, "train_summary.json"), "tokenizer_sha256"),
                      (os.path.join(gen_dir, os.pardir, "pipeline_config.json"), "tokenizer_sha256")):
        if os.path.isfile(path):
            with open(path) as f:
                sha = json.load(f).get(key)
            if sha:
                return sha, f"{os.path.normpath(path)} ({key}, from the codes' meta.json)"
    return None, ""


def assemble_pipeline(argv: list[str]) -> int:
    """--from pipeline TOKENIZER_DIR GENERATOR_DIR OUT_DIR [--labels ...] [--codes SHARDS] [key=value defaults]."""
    import yaml

    from generator import GPT
    from pipelines.pipeline import MGVQPipeline, SamplingDefaults
    from runtime.fingerprint import check_same_tokenizer
    from tokenizer import MGVQTokenizer

    labels, codes, pos, defaults = None, None, [], {}
    it = iter(argv)
    for a in it:
        if a == "--labels":
            labels = next(it, None)
        elif a == "--codes":
            codes = next(it, None)
            if codes is None:
                raise SystemExit("--codes needs the code-shard folder the generator was trained on (its meta.json)")
        elif "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            defaults[k] = None if v in ("None", "none") else yaml.safe_load(v)  # same syntax as the other converters
        else:
            pos.append(a)
    if len(pos) != 3:
        raise SystemExit("usage: mgvq convert --from pipeline TOKENIZER_DIR GENERATOR_DIR OUT_DIR [--labels ...] "
                         "[--codes SHARDS] [k=v]")
    from runtime.outdir import check_output_dir

    check_output_dir(pos[2], what="OUT_DIR")
    # the tokenizer must be the one that made the generator's training codes (sha256 of its weights file)
    sha, where = recorded_tokenizer_sha256(pos[1], codes)
    if sha is not None:
        check_same_tokenizer(pos[0], sha, what=where)
    else:
        print(f"note: {pos[1]} records no tokenizer sha256 (a converted or hand-made generator) and no --codes was "
              f"given, so nothing checks that {pos[0]} made its codes", file=sys.stderr)
    tok = MGVQTokenizer.from_pretrained(pos[0])
    gen = GPT.from_pretrained(pos[1])
    names = load_labels(labels, gen.config.num_classes)
    pipe = MGVQPipeline(tok, gen, id2label=names, sampling_defaults=SamplingDefaults.from_dict(defaults),
                        tokenizer_sha256=sha)
    pipe.save_pretrained(pos[2])
    print(f"wrote pipeline to {pos[2]} ({gen.config.num_classes} classes, G={gen.config.groups}, "
          f"K={gen.config.codebook_size}, {pipe.image_size}px)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    kind = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--from":
            if i + 1 >= len(argv):
                raise SystemExit("mgvq convert: --from needs a value, one of: " + ", ".join(KINDS))
            kind = argv[i + 1]
            i += 2
            continue
        if a.startswith("--from="):
            kind = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if kind not in KINDS:
        raise SystemExit(f"mgvq convert: --from {kind!r} is not a known kind; valid: {', '.join(KINDS)}")
    if kind == "pipeline":
        return assemble_pipeline(rest)
    module = importlib.import_module(KINDS[kind])
    if KINDS[kind] == "generator.convert":  # one module, two kinds
        rest = ["--from", kind] + rest
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
