"""Atomic file writes: write a temp file in the same folder, then rename (a reader never sees a partial file)."""
from __future__ import annotations

import contextlib
import json
import math
import os


def _tmp(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path in `path`'s folder for a writer that takes a file name; renamed onto `path` when the block
    succeeds, deleted when it raises (a reader never sees a partial file)."""
    path = os.fspath(path)
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def strict_json(obj):
    """Non-finite floats -> None (strict JSON), recursively through dicts / lists / tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(strict_json(obj), f, indent=indent)


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors file, atomically; tensors are made contiguous CPU copies."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(os.fspath(path), device=device)
