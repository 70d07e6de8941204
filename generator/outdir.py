"""Up-front output-folder check: an unwritable folder or a full disk fails at start, not hours into a run.

(tokenizer/, generator/ and evaluation/ each keep a copy of these few lines: they never import each other.)
"""
from __future__ import annotations

import os
import shutil

MIN_FREE_BYTES = 100 * 2**20  # refuse to start with less than 100 MiB free, whatever the run writes


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0, what: str = "output folder") -> None:
    """Create `path` if needed, prove it writable with a probe file, and require max(need_bytes, 100 MiB) free on
    its filesystem. Raises OSError naming the folder, the problem and what to do."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"{what} {path!r} is not writable ({type(e).__name__}: {e.strerror or e}); "
                      f"choose a folder that can be created and written") from e
    need, free = max(int(need_bytes), MIN_FREE_BYTES), shutil.disk_usage(path).free
    if free < need:
        raise OSError(f"{what} {path!r}: only {free / 2**20:.1f} MiB free on its filesystem, at least "
                      f"{need / 2**20:.1f} MiB needed; free some space or choose another folder")
