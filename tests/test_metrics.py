import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation import metrics as M



# ---------------------------------------------------------------- Fréchet distance

def test_frechet_distance_closed_form_commuting_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.5, 3.0, d), rng.uniform(0.5, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # same eigenvectors: (S1 S2)^1/2 = Q sqrt(ab) Q^T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_equals_scipy_on_general_covariances():
    rng = np.random.default_rng(1)
    d = 10
    x1, x2 = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
    s1, s2 = x1 @ x1.T / d, x2 @ x2.T / d
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # symmetric in its two arguments
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-7)


def test_frechet_distance_singular_covariances_are_finite():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0  # N < D: rank-deficient covariances
    (m1, s1), (m2, s2) = M.feature_statistics(f1), M.feature_statistics(f2)
    assert np.linalg.matrix_rank(s1) == 4
    fd = M.frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(fd) and fd > np.sum((m1 - m2) ** 2)


def test_frechet_distance_exactly_singular_pair_is_finite_and_emits_no_linalg_warning():
    """A feature that never varies (a dead ReLU unit of the demo's classifier) makes both covariances, and their
    product, exactly singular: scipy's sqrtm warns "Matrix is singular ..."; frechet_distance lets no warning through
    (ADM's disp=False) and its number is still exact."""
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) * 1.5 + 0.5
    f1[:, 2] = f2[:, 2] = 0.0  # dead in both sets
    (m1, s1), (m2, s2) = M.feature_statistics(f1), M.feature_statistics(f2)
    assert np.linalg.matrix_rank(s1) == np.linalg.matrix_rank(s2) == 5
    with pytest.warns(linalg.LinAlgWarning, match="singular"):  # the case this test is about (scipy itself warns)
        linalg.sqrtm(s1 @ s2)
    live = np.ix_([0, 1, 3, 4, 5], [0, 1, 3, 4, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, LinAlgWarning included, fails here
        fd = M.frechet_distance(m1, s1, m2, s2)
        # the dead dimension adds nothing: the distance over the live ones (a non-singular pair: scipy's formula)
        want = np.sum((m1 - m2) ** 2) + np.trace(s1[live] + s2[live] - 2 * linalg.sqrtm(s1[live] @ s2[live]).real)
        assert np.isfinite(fd) and fd == pytest.approx(want, rel=1e-9)
        # dead in one set only: singular product, finite distance, still silent
        g1 = f1.copy()
        g1[:, 4] = 3.0
        fd1 = M.frechet_distance(*M.feature_statistics(g1), m2, s2)
        assert np.isfinite(fd1) and fd1 > fd
        assert M.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3))) == 0.0


def test_frechet_distance_offsets_the_diagonal_when_the_root_fails(monkeypatch):
    """ADM / torch-fidelity's fallback: a non-finite (or, flagged by scipy, inaccurate) root -> eps * I added to both
    covariances, root again; scipy's LinAlgWarning never reaches the caller; a large imaginary part is an error."""
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    s1, s2, m1, m2 = x1 @ x1.T / 8, x2 @ x2.T / 8, rng.normal(size=4), rng.normal(size=4)
    real_sqrtm, calls = linalg.sqrtm, []

    def failing_once(a):
        calls.append(a)
        if len(calls) == 1:
            warnings.warn("Matrix is singular. The result might be inaccurate", linalg.LinAlgWarning)
            return np.full_like(a, np.nan)
        return real_sqrtm(a)

    monkeypatch.setattr(M.linalg, "sqrtm", failing_once)
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        with pytest.warns(UserWarning, match="adding 0.001 to the diagonal"):
            fd = M.frechet_distance(m1, s1, m2, s2, eps=1e-3)
    off = np.eye(4) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * real_sqrtm((s1 + off) @ (s2 + off)).real)
    assert fd == pytest.approx(want, rel=1e-12)
    # flagged but accurate: no offset (ADM's number); flagged and wrong: offset
    calls.clear()
    monkeypatch.setattr(M.linalg, "sqrtm", lambda a: (calls.append(a), warnings.warn("x", linalg.LinAlgWarning),
                                                      real_sqrtm(a))[-1])
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(
        np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * real_sqrtm(s1 @ s2).real), rel=1e-12)
    assert len(calls) == 1
    monkeypatch.setattr(M.linalg, "sqrtm", lambda a: (calls.append(a), warnings.warn("x", linalg.LinAlgWarning),
                                                      real_sqrtm(a) * (1.1 if len(calls) == 2 else 1.0))[-1])
    with pytest.warns(UserWarning, match="singular product"):
        M.frechet_distance(m1, s1, m2, s2)
    assert len(calls) == 3
    monkeypatch.setattr(M.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j * np.eye(len(a)))
    with pytest.raises(ValueError, match="imaginary component"):
        M.frechet_distance(m1, s1, m2, s2)


def test_feature_statistics_and_sampled_gaussians():
    rng = np.random.default_rng(3)
    f1 = rng.normal(0.0, 1.0, size=(20000, 3))
    f2 = rng.normal(0.5, 2.0, size=(20000, 3))
    mu, sigma = M.feature_statistics(f1)
    np.testing.assert_allclose(mu, f1.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f1, rowvar=False))
    fd = M.frechet_distance(*M.feature_statistics(f1), *M.feature_statistics(f2))
    assert fd == pytest.approx(3 * 0.25 + 3 * (2.0 - 1.0) ** 2, rel=0.05)  # = 3.75
    with pytest.raises(ValueError, match="mu shapes differ"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_distance_to_features_low_rank_path_equals_sqrtm():
    rng = np.random.default_rng(7)
    d = 40
    x = rng.normal(size=(d, 3 * d))
    mu2, s2 = rng.normal(size=d), x @ x.T / (3 * d)
    for n in (5, 40, 200):  # 5, 40: low-rank eigen path; 200: ADM sqrtm path
        f = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + 0.3
        want = M.frechet_distance(*M.feature_statistics(f), mu2, s2)
        assert M.frechet_distance_to_features(f, mu2, s2) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- Inception score

def test_inception_score_by_hand():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [-2.0, 0.5, 4.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def one_split(pp):
        q = pp.mean(0)
        return np.exp(np.mean(np.sum(pp * (np.log(pp) - np.log(q)), 1)))

    mean, std = M.inception_score(logits=logits, splits=2)
    scores = [one_split(p[:2]), one_split(p[2:])]
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-10)
    assert M.inception_score(probs=p, splits=1)[0] == pytest.approx(one_split(p), rel=1e-10)


def test_inception_score_extremes():
    c = 5
    onehot = np.tile(np.eye(c), (4, 1)) * 0.999 + 0.001 / c  # confident and spread evenly over c classes
    assert M.inception_score(probs=onehot / onehot.sum(1, keepdims=True), splits=2)[0] == pytest.approx(c, rel=0.02)
    same = np.tile([[0.7, 0.2, 0.1]], (10, 1))  # no diversity: IS = 1
    assert M.inception_score(probs=same, splits=5) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="exactly one"):
        M.inception_score()
    with pytest.raises(ValueError, match="splits=11"):
        M.inception_score(probs=same, splits=11)


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_by_hand():
    ref = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [4, 0]])
    smp = np.array([[0.5, 0], [100, 0], [101, 0], [102, 0], [103, 0]])
    # ref k=3 radii: 3, 2, 2, 2, 3 -> only 0.5 lies inside. Sample 0.5's 3rd neighbour is 102 (radius 101.5):
    # the outlier's huge ball covers every reference point, so recall is 1.
    assert M.precision_recall(ref, smp, k=3) == pytest.approx((0.2, 1.0))
    assert M.precision_recall(ref, ref, k=3) == pytest.approx((1.0, 1.0))
    np.testing.assert_allclose(M.manifold_radii(ref, k=3).numpy(), np.array([3, 2, 2, 2, 3.0]) ** 2)


def _brute_force_pr(ref, smp, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    d = np.linalg.norm(ref[:, None] - smp[None], axis=-1)
    precision = np.mean((d <= radii(ref)[:, None]).any(0))
    recall = np.mean((d <= radii(smp)[None]).any(1))
    return precision, recall


def test_precision_recall_batched_matches_brute_force():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(60, 8)).astype(np.float32)
    smp = (rng.normal(size=(45, 8)) * 1.5 + 0.7).astype(np.float32)
    expected = _brute_force_pr(ref.astype(np.float64), smp.astype(np.float64), 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert M.precision_recall(ref, smp, k=3, batch_size=7) == pytest.approx(expected)
    assert M.precision_recall(ref, smp, k=3, batch_size=10000) == pytest.approx(expected)


# ---------------------------------------------------------------- PSNR / SSIM

def _photo_pair():
    x = np.stack([data.astronaut()[::4, ::4], data.chelsea()[:128, :128], data.coffee()[100:228, 200:328]])
    rng = np.random.default_rng(5)
    noise = rng.normal(0, [[[[4.0]]], [[[12.0]]], [[[25.0]]]], size=x.shape)
    y = np.clip(x + noise, 0, 255).round().astype(np.uint8)
    return x, y


def test_psnr_conventions_agree_with_skimage():
    x, y = _photo_pair()
    per_image = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x, y)]
    assert M.psnr_mean_of_images(x, y) == pytest.approx(np.mean(per_image), rel=1e-10)
    mse = np.mean([np.mean((a / 255.0 - b / 255.0) ** 2) for a, b in zip(x, y)])
    assert M.psnr_of_mean_mse(x, y) == pytest.approx(20 * np.log10(1 / np.sqrt(mse)), rel=1e-10)
    assert M.psnr_of_mean_mse(x, y) < M.psnr_mean_of_images(x, y)  # Jensen: different noise levels per image
    # float [0, 1] NCHW tensors give the same numbers as uint8 NHWC
    xt, yt = (torch.from_numpy(v).permute(0, 3, 1, 2).double() / 255 for v in (x, y))
    assert M.psnr_mean_of_images(xt, yt) == pytest.approx(np.mean(per_image), rel=1e-10)
    assert M.psnr_from_mse(0.0) == np.inf


def test_ssim_agrees_with_skimage():
    x, y = _photo_pair()
    expected = [structural_similarity(a, b, channel_axis=-1) for a, b in zip(x, y)]
    got = M.ssim_per_image(x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] > got[1] > got[2]  # more noise, lower SSIM
    assert M.ssim_per_image(x, x) == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        M.ssim_per_image(x.astype(np.float32), y)


# ---------------------------------------------------------------- npz, images

def test_adm_npz_roundtrip_and_reference_stats(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(7, 16, 12, 3), dtype=np.uint8)
    M.save_npz(tmp_path / "samples.npz", images, labels=np.arange(7) % 3)
    np.testing.assert_array_equal(M.load_npz_images(tmp_path / "samples.npz"), images)
    with np.load(tmp_path / "samples.npz") as f:
        assert sorted(f.keys()) == ["arr_0", "arr_1"] and f["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert M.load_npz_stats(tmp_path / "samples.npz") is None
    # a VIRTUAL_imagenet256_labeled.npz-like reference batch: arr_0 + mu/sigma (+ sFID stats)
    mu, sigma = rng.normal(size=4).astype(np.float32), np.eye(4)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    m2, s2 = M.load_npz_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(m2, mu.astype(np.float64))
    assert m2.dtype == np.float64 and s2.shape == (4, 4)
    with pytest.raises(ValueError, match="uint8"):
        M.save_npz(tmp_path / "bad.npz", images.astype(np.float32))


def test_resize_cover_crop_and_to_uint8():
    from PIL import Image

    img = Image.fromarray(data.coffee())  # 600 x 400 (w x h)
    out = M.resize_cover_crop(img, (256, 256))
    assert out.size == (256, 256)
    assert M.resize_cover_crop(img, (2560, 1440)).size == (2560, 1440)
    x = torch.tensor([[[[-0.1, 0.0, 0.5 / 255, 0.5, 1.0, 1.2]]]]).expand(1, 3, 1, 6)
    assert M.to_uint8(x)[0, 0, 0].tolist() == [0, 0, 1, 128, 255, 255]


# ---------------------------------------------------------------- Inception features (real code path, random weights)

@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    return M.save_random_inception_weights(tmp_path_factory.mktemp("inc") / "random_inception.pth", seed=0)


def test_inception_features_real_code_path(random_inception):
    inc = M.InceptionFeatures(random_inception, batch_size=4)
    x = torch.from_numpy(np.stack([data.astronaut()[::8, ::8], data.chelsea()[:64, :64], data.coffee()[:64, :64],
                                   data.astronaut()[::8, ::8][:, ::-1].copy()]))
    x = x.permute(0, 3, 1, 2).contiguous()
    pool, logits = inc(x)
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
    assert np.isfinite(pool).all() and pool.std() > 1e-3  # kaiming init: non-degenerate features
    pool2, logits2 = inc(iter([x[:1], x[1:]]))  # batch composition does not change features
    np.testing.assert_allclose(pool2, pool, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits2, logits, rtol=1e-4, atol=1e-5)
    is_mean, _ = M.inception_score(logits=logits, splits=1)
    assert is_mean >= 1.0
    with pytest.raises(ValueError, match="uint8"):
        inc(x.float())


def test_inception_missing_weights_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as e:
        M.InceptionFeatures(tmp_path / "nothing_here.pth")
    assert str(tmp_path / "nothing_here.pth") in str(e.value) and "hub/checkpoints" in str(e.value)


# ---------------------------------------------------------------- Inception weights: --inception-weights auto

def test_inception_weights_auto_uses_cache_then_downloads(tmp_path, monkeypatch, random_inception):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    dst = tmp_path / "torch" / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_NAME
    assert M.default_inception_weights_path() == dst
    calls = []

    def fake_download(url, path):  # what a reachable release would give: the file lands in torch.hub's cache
        calls.append((url, path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random_inception.read_bytes())

    monkeypatch.setattr(M, "_download_file", fake_download)
    assert M.resolve_inception_weights("auto") == dst and calls == [(M.INCEPTION_WEIGHTS_URL, dst)]
    inc = M.InceptionFeatures("auto", batch_size=2)  # cached now: no second download
    assert inc.weights_path == dst and len(calls) == 1
    assert M.resolve_inception_weights(None) == dst and len(calls) == 1
    x = torch.from_numpy(data.astronaut()[::16, ::16][None]).permute(0, 3, 1, 2).contiguous()
    ref_pool, _ = M.InceptionFeatures(random_inception)(x)
    np.testing.assert_array_equal(inc(x)[0], ref_pool)  # the downloaded file is the one used


@pytest.mark.parametrize("error, said", [
    ("dns", "github.com could not be resolved"),
    ("http", "HTTP 404 Not Found"),
    ("refused", "the connection failed (ConnectionRefusedError"),
    ("disk", "PermissionError: [Errno 13] Permission denied"),
])
def test_inception_weights_auto_says_what_failed_and_what_to_fetch(tmp_path, monkeypatch, error, said):
    import socket
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def failing_download(url, path):
        raise {"dns": urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
               "http": urllib.error.HTTPError(url, 404, "Not Found", {}, None),
               "refused": urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
               "disk": PermissionError(13, "Permission denied")}[error]

    monkeypatch.setattr(M, "_download_file", failing_download)
    with pytest.raises(FileNotFoundError) as e:
        M.InceptionFeatures("auto")
    msg = str(e.value)
    assert said in msg
    assert f"Fetch {M.INCEPTION_WEIGHTS_URL}" in msg  # exactly which file
    assert f"put it at {tmp_path / 'torch' / 'hub' / 'checkpoints' / M.INCEPTION_WEIGHTS_NAME}" in msg  # and where
    assert "offline" not in msg


def test_inception_weights_no_download_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(M, "_download_file", lambda url, path: pytest.fail("download attempted"))
    with pytest.raises(FileNotFoundError, match="downloading is switched off"):
        M.resolve_inception_weights("auto", download=False)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth does not exist\. Fetch https://"):
        M.resolve_inception_weights(tmp_path / "nothing.pth")  # an explicit path never triggers a download
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="is not torch-fidelity's weights-inception"):
        M.InceptionFeatures(tmp_path / "wrong.pth")


def test_inception_download_is_atomic(tmp_path, monkeypatch):
    """torch.hub's downloader writes to '<name>.part' next to the destination; only a finished file is renamed."""
    dst = tmp_path / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_NAME
    seen = []

    def torn(url, path, progress=True):
        seen.append((url, path))
        Path(path).write_bytes(b"half a file")
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(torch.hub, "download_url_to_file", torn)
    with pytest.raises(ConnectionResetError):
        M._download_file(M.INCEPTION_WEIGHTS_URL, dst)
    assert seen == [(M.INCEPTION_WEIGHTS_URL, str(dst) + ".part")]
    assert not dst.exists() and not Path(str(dst) + ".part").exists()  # nothing torn is left to be picked up
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, path, progress=True: Path(path).write_bytes(b"ok"))
    M._download_file(M.INCEPTION_WEIGHTS_URL, dst)
    assert dst.read_bytes() == b"ok" and sorted(p.name for p in dst.parent.iterdir()) == [dst.name]
