"""`mgvq convert --from KIND CHECKPOINT OUT_DIR [key=value ...]`: third-party checkpoints -> this project's folders.

Kinds:
  llamagen-vq     LlamaGen VQ-16 / VQ-8 tokenizer (.pt, weights under "model"/"ema"/"state_dict" or bare)
  mgvq-tokenizer  released MGVQ tokenizers (mgvq_f{8,16,32}c32_g{4,8}[_mix].pt, weights under "model")
  llamagen-gpt    LlamaGen c2i GPT (c2i_B_256.pt ...; give n_head= and grid= when the weights cannot tell)
  mgvq-gpt        released MGVQ GPT (needs --tokenizer DIR: its input projector reads the tokenizer's raw codebook)

Examples:
  mgvq convert --from llamagen-vq vq_ds16_c2i.pt weights/llamagen-vq16
  mgvq convert --from llamagen-gpt c2i_L_256.pt weights/llamagen-gpt-l grid=16
  mgvq convert --from mgvq-tokenizer mgvq_f16c32_g4.pt weights/mgvq-f16-g4
  mgvq convert --from mgvq-gpt MGVQ_GPT_XXL.pt weights/mgvq-gpt-xxl --tokenizer weights/mgvq-f16-g4 grid=24

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
}


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
    module = importlib.import_module(KINDS[kind])
    if KINDS[kind] == "generator.convert":  # one module, two kinds
        rest = ["--from", kind] + rest
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
