r"""`mgvq convert --from KIND CHECKPOINT OUT_DIR [key=value ...]`: third-party checkpoints -> this project's folders.

Kinds:
  llamagen-vq     LlamaGen VQ-16 / VQ-8 tokenizer (.pt, weights under "model"/"ema"/"state_dict" or bare)
  mgvq-tokenizer  released MGVQ tokenizers (mgvq_f{8,16,32}c32_g{4,8}[_mix].pt, weights under "model")
  llamagen-gpt    LlamaGen c2i GPT (c2i_B_256.pt ...; give n_head= and grid= when the weights cannot tell)
  mgvq-gpt        released MGVQ GPT (needs --tokenizer DIR: its input projector reads the tokenizer's raw codebook)
  pipeline        assemble converted (or trained) TOKENIZER_DIR + GENERATOR_DIR into a pipeline folder that
                  MGVQPipeline.from_pretrained loads: --from pipeline TOKENIZER_DIR GENERATOR_DIR OUT_DIR
                  [--labels imagenet|FILE.json|FILE.txt] [guidance_scale=.. top_k=.. ...sampling defaults]

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


def assemble_pipeline(argv: list[str]) -> int:
    """--from pipeline TOKENIZER_DIR GENERATOR_DIR OUT_DIR [--labels ...] [key=value sampling defaults]."""
    import yaml

    from generator import GPT
    from pipelines.pipeline import MGVQPipeline, SamplingDefaults
    from tokenizer import MGVQTokenizer

    labels, pos, defaults = None, [], {}
    it = iter(argv)
    for a in it:
        if a == "--labels":
            labels = next(it, None)
        elif "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            defaults[k] = None if v in ("None", "none") else yaml.safe_load(v)  # same syntax as the other converters
        else:
            pos.append(a)
    if len(pos) != 3:
        raise SystemExit("usage: mgvq convert --from pipeline TOKENIZER_DIR GENERATOR_DIR OUT_DIR [--labels ...] [k=v]")
    from tokenizer.outdir import check_output_dir

    check_output_dir(pos[2], what="OUT_DIR")
    tok = MGVQTokenizer.from_pretrained(pos[0])
    gen = GPT.from_pretrained(pos[1])
    names = load_labels(labels, gen.config.num_classes)
    pipe = MGVQPipeline(tok, gen, id2label=names, sampling_defaults=SamplingDefaults.from_dict(defaults))
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
