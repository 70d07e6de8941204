"""Which tokenizer made a set of codes: the sha256 of its weights file, recorded in the shards' meta.json and checked
wherever codes meet a tokenizer again (training with `codebook=`, `mgvq convert --from pipeline`, pipeline loading)."""
from __future__ import annotations

import hashlib
import os

WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tok_dir: str | os.PathLike) -> str:
    """sha256 of a tokenizer folder's weights file (the value `mgvq cache-codes` writes to meta.json)."""
    path = os.path.join(tok_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer folder {tok_dir}: {WEIGHTS_FILE} not found")
    return sha256_file(path)


def check_same_tokenizer(tok_dir: str | os.PathLike, expected_sha256: str | None, what: str) -> None:
    """Raise when the tokenizer in `tok_dir` is not the one whose sha256 `what` (e.g. "shards/x/meta.json") recorded.

    `expected_sha256=None` (nothing recorded) passes: older shards and hand-made folders carry no fingerprint."""
    if not expected_sha256:
        return
    actual = tokenizer_sha256(tok_dir)
    if actual != expected_sha256:
        raise ValueError(f"tokenizer {tok_dir} (sha256 {actual}) is not the tokenizer that made the codes: {what} records "
                         f"sha256 {expected_sha256}. Use the tokenizer folder the codes were cached with, or re-run "
                         f"`mgvq cache-codes` with this one.")
