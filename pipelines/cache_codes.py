"""`mgvq cache-codes`: tokenizer.cache_codes with the T5 caption encoder wired in (tokenizer/ never imports
pipelines/, so --caption-encoder is resolved here and handed down as a callable).

    mgvq cache-codes --tokenizer runs/tok/final --data hf:my/captioned-set --caption-column text \
        --caption-encoder google/flan-t5-xl --caption-max-length 120 --out shards/t2i
"""
from __future__ import annotations

import sys


def t5_features_fn(name_or_path: str, max_length: int):
    from pipelines.text_encoder import T5TextEncoder

    return T5TextEncoder.from_pretrained(name_or_path, max_length=max_length)


def main(argv: list[str] | None = None) -> int:
    from tokenizer.cache_codes import main as cache_codes_main

    return cache_codes_main(list(sys.argv[1:] if argv is None else argv), text_encoder_factory=t5_features_fn)


if __name__ == "__main__":
    sys.exit(main())
