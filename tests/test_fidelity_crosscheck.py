"""Our FID / IS / sFID against independent implementations, on the same small image folders.

- FID and IS: torch-fidelity's own `calculate_metrics` reading the two PNG folders itself.
- sFID features: a hand-written forward pass through torch-fidelity's Inception up to ADM's `mixed_6/conv`
  (= Mixed_6d.branch1x1), first 7 channels in TF's (h, w, c) order.
Random (kaiming) Inception weights in the real file format: the numbers are not FID/IS, the machinery is the same.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from evaluation import metrics as M
from evaluation import sample as S

N = 16  # images per folder: small for 2 CPU cores (each image is resized to 299 inside Inception)


def _crops(seed: int, n: int) -> np.ndarray:
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        p = photos[rng.integers(len(photos))][::4, ::4]
        y, x = rng.integers(0, p.shape[0] - 32), rng.integers(0, p.shape[1] - 32)
        out.append(p[y:y + 32, x:x + 32])
    return np.stack(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_folders")
    a, b = _crops(0, N), _crops(1, N)
    b = np.clip(b.astype(np.int16) + np.random.default_rng(2).integers(-40, 40, b.shape), 0, 255).astype(np.uint8)
    for name, imgs in (("a", a), ("b", b)):
        (root / name).mkdir()
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(root / name / f"{i:06d}.png")
    weights = M.save_random_inception_weights(root / "random_inception.pth", seed=0)
    return root / "a", root / "b", weights, a


def test_fid_is_equal_torch_fidelity_calculate_metrics(folders, tmp_path):
    import torch_fidelity

    dir_a, dir_b, weights, _ = folders
    inc = M.InceptionFeatures(weights, batch_size=N)
    (pool_a, logits_a), (pool_b, _) = (inc(M.iter_batches(M.ImageFolder(d), N)) for d in (dir_a, dir_b))
    theirs = torch_fidelity.calculate_metrics(
        input1=str(dir_a), input2=str(dir_b), cuda=False, isc=True, fid=True, isc_splits=4, samples_shuffle=False,
        feature_extractor_weights_path=str(weights), batch_size=N, save_cpu_ram=True, cache=False, verbose=False)
    fid_adm = M.frechet_distance(*M.feature_statistics(pool_a), *M.feature_statistics(pool_b))  # ADM's formula
    fid_small_n = M.frechet_distance_to_features(pool_a, *M.feature_statistics(pool_b))  # evaluate_samples, N <= D
    is_mean, is_std = M.inception_score(logits=logits_a, splits=4)
    print(f"FID ours (ADM sqrtm) {fid_adm!r}, ours (exact low-rank) {fid_small_n!r}, IS ours {is_mean!r} +- {is_std!r};"
          f" torch-fidelity {theirs}")
    assert fid_adm > 1.0  # the two folders differ: a non-trivial distance
    assert fid_adm == pytest.approx(theirs["frechet_inception_distance"], rel=2e-6)
    # With N=16 << 2048 both covariances have rank <= 15: sqrtm / eigvals of the 2048 x 2048 product add the square
    # roots of ~2000 round-off eigenvalues to the trace (a small downward bias); the low-rank path avoids them.
    assert fid_small_n == pytest.approx(theirs["frechet_inception_distance"], rel=3e-4)
    assert is_mean > 1.0
    assert is_mean == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert is_std == pytest.approx(theirs["inception_score_std"], rel=1e-6)


def _manual_mixed_6_conv(model, x_uint8: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's InceptionV3 forward written out up to Mixed_6d's 1x1 branch (TF: mixed_6/conv)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(x_uint8.float(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
        x = getattr(model, name)(x)
    return model.Mixed_6d.branch1x1(x)  # (B, 192, 17, 17), after batch norm and ReLU like TF's conv op


def test_spatial_features_are_adm_mixed_6_conv_first_7_channels(folders):
    _, _, weights, images_a = folders
    inc = M.InceptionFeatures(weights, batch_size=5)
    x = torch.from_numpy(images_a[:6]).permute(0, 3, 1, 2).contiguous()
    pool, logits, spatial = inc(x, spatial=True)
    assert spatial.shape == (6, 2023) == (6, M.SPATIAL_DIM)
    with torch.no_grad():
        full = _manual_mixed_6_conv(inc.model, x)
    assert full.shape == (6, 192, 17, 17)
    # ADM: spatial[..., :7] of an NHWC tensor, reshaped to [N, -1] -> index (h * 17 + w) * 7 + c
    want = full.permute(0, 2, 3, 1)[..., :7].reshape(6, -1).double().numpy()
    np.testing.assert_allclose(spatial, want, rtol=1e-5, atol=1e-6)
    assert spatial[2, (3 * 17 + 5) * 7 + 4] == pytest.approx(float(full[2, 4, 3, 5]), rel=1e-5)
    assert spatial.std() > 1e-3 and (spatial >= 0).all()  # ReLU output
    # without spatial=True the call returns the two arrays it always did, unchanged
    pool2, logits2 = inc(x)
    np.testing.assert_array_equal(pool2, pool)
    np.testing.assert_array_equal(logits2, logits)


def test_sfid_in_evaluate_samples_folder_and_npz_references(folders, tmp_path):
    """sFID next to FID: against an image folder from its images' spatial features; against an ADM npz like
    VIRTUAL_imagenet256_labeled.npz from its stored mu_s/sigma_s, used as they are (like mu/sigma for FID)."""
    _, dir_b, weights, images_a = folders
    inc = M.InceptionFeatures(weights, batch_size=N)
    pool, _, spatial = inc(M.iter_batches(images_a, N), spatial=True)
    res = S.evaluate_samples(images_a, dir_b, inc, splits=2, batch_size=N, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("ref_features_*.npz")
    with np.load(cache) as f:
        pool_b, spatial_b = f["pool"], f["spatial"]
    assert spatial_b.shape == (N, 2023)
    assert res["fid"] == pytest.approx(M.frechet_distance_to_features(pool, *M.feature_statistics(pool_b)), rel=1e-6)
    assert res["sfid"] == pytest.approx(M.frechet_distance_to_features(spatial, *M.feature_statistics(spatial_b)),
                                        rel=1e-6)
    assert res["sfid"] > 0 and res["sfid"] != pytest.approx(res["fid"], rel=1e-3)

    rng = np.random.default_rng(3)
    mu_s, sigma_s = M.feature_statistics(spatial + rng.normal(0, 0.1, spatial.shape))
    mu, sigma = M.feature_statistics(pool + 0.5)
    M.save_npz_stats(tmp_path / "ref.npz", mu, sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = S.evaluate_samples(images_a, tmp_path / "ref.npz", inc, splits=2, batch_size=N)
    assert res["fid"] == pytest.approx(M.frechet_distance_to_features(pool, mu, sigma), rel=1e-6)
    assert res["sfid"] == pytest.approx(M.frechet_distance_to_features(spatial, mu_s, sigma_s), rel=1e-6)
    # a reference with FID statistics only (no mu_s/sigma_s, no images): sFID cannot be computed -> None
    M.save_npz_stats(tmp_path / "ref_nos.npz", mu, sigma)
    assert S.evaluate_samples(images_a[:4], tmp_path / "ref_nos.npz", inc, splits=2, batch_size=N)["sfid"] is None
    with pytest.raises(ValueError, match="both mu_s and sigma_s"):
        M.save_npz_stats(tmp_path / "bad.npz", mu, sigma, mu_s=mu_s)
