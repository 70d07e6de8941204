import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation import metrics as M
from evaluation import reconstruct as R
from pipelines import evaluate_tokenizer as ET

G, K, FACTOR = 3, 16, 8



class BlockQuantizer:
    """Toy tokenizer: 8x8 block means, group g = colour channel g, K random levels per group (nearest level)."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.codebook = torch.sort(torch.rand(G, K, generator=gen) * 2 - 1, dim=1).values  # (G, K)

    def encode(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, h, w, G)
        m = F.avg_pool2d(x, FACTOR).permute(0, 2, 3, 1)
        return (m[..., None] - self.codebook).abs().argmin(-1)

    def decode(self, idx, groups_to_use=None):
        v = torch.stack([self.codebook[g][idx[..., g]] for g in range(G)], dim=1)  # (B, 3, h, w)
        if groups_to_use is not None:
            v[:, groups_to_use:] = 0
        return F.interpolate(v, scale_factor=FACTOR, mode="nearest")


def l1_lpips(x, y):  # stands in for LPIPS: any callable on [-1, 1] images returning per-image values
    return (x - y).abs().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.png")
    return d


def _direct(toy, images):
    x_u8 = torch.from_numpy(np.stack([images[i] for i in range(len(images))])).permute(0, 3, 1, 2)
    x = x_u8.float() / 127.5 - 1
    idx = toy.encode(x)
    rec = {g: M.to_uint8((toy.decode(idx, g) + 1) / 2) for g in range(1, G + 1)}
    return x_u8, x, idx, rec


def test_reconstruction_metrics_equal_direct_computation(photo_dir, tmp_path):
    toy = BlockQuantizer()
    images = M.ImageFolder(photo_dir, size=(64, 48))  # resize to cover + centre crop, non-square
    assert images[0].shape == (48, 64, 3)
    res = R.evaluate_reconstruction(toy.encode, toy.decode, images, groups=G, codebook_size=K, lpips_fn=l1_lpips,
                                    batch_size=3, num_examples=1, out_dir=tmp_path, progress=False)
    x_u8, x, idx, rec = _direct(toy, images)
    full = rec[G]
    xh, rh = M.nchw_to_nhwc(x_u8), M.nchw_to_nhwc(full)
    psnrs = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(xh, rh)]
    mse = np.mean([np.mean((a / 255.0 - b / 255.0) ** 2) for a, b in zip(xh, rh)])
    assert res["num_images"] == 4 and res["resolution"] == "64x48"
    assert res["psnr_mean_of_images"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert res["psnr_of_mean_mse"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-9)
    assert res["ssim"] == pytest.approx(np.mean([structural_similarity(a, b, channel_axis=-1)
                                                 for a, b in zip(xh, rh)]), rel=1e-9)
    assert res["lpips"] == pytest.approx(float(l1_lpips(x, full.float() / 127.5 - 1).mean()), rel=1e-5)
    usage = [len(torch.unique(idx[..., g])) / K for g in range(G)]
    assert res["codebook_usage"] == pytest.approx(usage) and 0 < min(usage) <= max(usage) <= 1
    assert all(1 <= p <= K for p in res["codebook_perplexity"])
    # coarse-to-fine: later groups zeroed; every extra group adds information here
    by_g = res["psnr_of_mean_mse_by_groups_to_use"]
    assert list(by_g) == ["1", "2", "3"] and by_g["3"] == pytest.approx(res["psnr_of_mean_mse"])
    assert by_g["1"] < by_g["2"] < by_g["3"]
    assert by_g["1"] == pytest.approx(M.psnr_of_mean_mse(x_u8, rec[1]), rel=1e-9)
    # side-by-side examples: one worst and one best, original | reconstruction
    worst, best = sorted(range(4), key=lambda i: psnrs[i])[0], sorted(range(4), key=lambda i: psnrs[i])[-1]
    assert res["examples"] == [f"worst_01_img{worst:06d}_psnr{psnrs[worst]:.2f}.png",
                               f"best_01_img{best:06d}_psnr{psnrs[best]:.2f}.png"]
    side = np.asarray(Image.open(tmp_path / "examples" / res["examples"][1]))
    np.testing.assert_array_equal(side, np.concatenate([xh[best], rh[best]], axis=1))
    assert res["rfid"] is None and "PSNR (dataset-mean MSE, MGVQ)" in R.format_table(res)


def test_rfid_with_random_inception(photo_dir, tmp_path):
    weights = M.save_random_inception_weights(tmp_path / "inc.pth", seed=0)
    inc = M.InceptionFeatures(weights, batch_size=8)
    toy = BlockQuantizer()
    images = M.ImageFolder(photo_dir, size=(32, 32))
    res = R.evaluate_reconstruction(toy.encode, toy.decode, images, groups=G, inception=inc, batch_size=4,
                                    coarse_to_fine=False, num_examples=0, progress=False)
    x_u8, _, idx, rec = _direct(toy, images)
    pool, _ = inc(torch.cat([x_u8, rec[G]]))
    assert res["rfid"] > 0
    assert res["rfid"] == pytest.approx(M.frechet_distance_to_features(pool[4:], *M.feature_statistics(pool[:4])),
                                        rel=1e-4)
    assert res["codes_used"] == [len(torch.unique(idx[..., g])) for g in range(G)]  # no codebook_size given
    assert "psnr_of_mean_mse_by_groups_to_use" not in res and "examples" not in res


def test_resolution_parsing_and_errors(photo_dir):
    assert R.parse_resolution("256") == (256, 256)
    assert R.parse_resolution("2K") == (2560, 1440)
    assert R.parse_resolution("640x360") == (640, 360)
    with pytest.raises(ValueError, match="resolution='big'"):
        R.parse_resolution("big")
    toy = BlockQuantizer()
    images = M.ImageFolder(photo_dir, size=(32, 32))
    with pytest.raises(ValueError, match="encode_fn must return indices"):
        R.evaluate_reconstruction(lambda x: toy.encode(x)[..., :2], toy.decode, images, groups=G, progress=False)


def test_cli_with_a_real_tiny_tokenizer(photo_dir, tmp_path, monkeypatch, capsys):
    from tokenizer import MGVQTokenizer

    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny")
    tok.save_pretrained(str(tmp_path / "tok"))
    monkeypatch.setenv("MGVQ_LPIPS_DIR", str(tmp_path / "no_lpips"))  # LPIPS weights absent -> skipped with a note
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no Inception weights -> rFID skipped
    assert ET.main(["--tokenizer", str(tmp_path / "tok"), "--data", str(photo_dir), "--resolution", "32",
                   "--max-images", "3", "--batch-size", "2", "--num-examples", "1",
                   "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert res["num_images"] == 3 and res["groups"] == tok.config.groups and res["rfid"] is None
    assert len(res["codebook_usage"]) == tok.config.groups
    assert list(res["psnr_of_mean_mse_by_groups_to_use"]) == [str(g) for g in range(1, tok.config.groups + 1)]
    assert np.isfinite(res["psnr_of_mean_mse"]) and len(res["examples"]) == 2
    out = capsys.readouterr().out
    assert "rFID skipped" in out and "LPIPS skipped" in out
    with pytest.raises(SystemExit):
        ET.main(["--help"])
    assert "mgvq evaluate-tokenizer --tokenizer" in capsys.readouterr().out
