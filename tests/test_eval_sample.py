import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from evaluation import metrics as M
from evaluation import sample as S
from pipelines import evaluate_generation as EG

N, C, B = 10, 3, 3  # 10 images, 3 classes, batches of 3 -> 4 batches (the last one short)



class ToyNet(torch.nn.Module):
    """A fixed tiny random conv net: image = sigmoid(net(noise + class embedding)), 12x12."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(C, 4)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 3, 3, padding=1))

    @torch.no_grad()
    def forward(self, z, labels):
        return torch.sigmoid(3 * self.net(z + self.emb(labels)[:, :, None, None]))


def per_image_sample_fn(labels, seeds):
    """Seeded per image: image i depends only on (label_i, seed_i)."""
    z = torch.stack([torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return ToyNet()(z, labels)


def per_batch_sample_fn(labels, seeds):
    """One generator per batch, seeded with the batch's first seed (what the pipeline CLI does)."""
    z = torch.randn(len(seeds), 4, 12, 12, generator=torch.Generator().manual_seed(seeds[0]))
    return ToyNet()(z, labels)


def _read_pngs(folder, n):
    return np.stack([np.asarray(Image.open(S.image_path(folder, i))) for i in range(n)])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dirs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = S.Dist()  # accelerate PartialState with gloo
    assert (dist.rank, dist.world_size) == (rank, world)
    for fn, out in zip((per_image_sample_fn, per_batch_sample_fn), out_dirs):
        S.generate_samples(fn, out, N, C, B, seed=100, dist=dist, progress=False)


def test_batches_for_rank_partition():
    got = [S.batches_for_rank(N, B, r, 2) for r in range(2)]
    assert [list(map(list, g)) for g in got] == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9]]]
    flat = sorted(i for g in got for c in g for i in c)
    assert flat == list(range(N))
    assert [list(c) for c in S.batches_for_rank(5, 1, 1, 2)] == [[1], [3]]  # B=1: rank r takes i % world == r
    with pytest.raises(ValueError, match="rank=2"):
        S.batches_for_rank(N, B, 2, 2)


def test_two_processes_equal_one_process(tmp_path):
    one = [tmp_path / "one_img", tmp_path / "one_batch"]
    for fn, out in zip((per_image_sample_fn, per_batch_sample_fn), one):
        S.generate_samples(fn, out, N, C, B, seed=100, progress=False)
    two = [tmp_path / "two_img", tmp_path / "two_batch"]
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(_read_pngs(a / "images", N), _read_pngs(b / "images", N))
        np.testing.assert_array_equal(M.load_npz_images(a / "samples.npz"), M.load_npz_images(b / "samples.npz"))
    # the two samplers are really different functions of the seeds
    assert not np.array_equal(_read_pngs(one[0] / "images", N), _read_pngs(one[1] / "images", N))


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    ref = tmp_path / "ref"
    S.generate_samples(per_batch_sample_fn, ref, N, C, B, seed=7, progress=False)

    calls = []

    def crashing(labels, seeds):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")
        calls.append(list(seeds))
        return per_batch_sample_fn(labels, seeds)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        S.generate_samples(crashing, out, N, C, B, seed=7, progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert not (out / "samples.npz").exists()

    calls.clear()

    def counting(labels, seeds):
        calls.append(list(seeds))
        return per_batch_sample_fn(labels, seeds)

    S.generate_samples(counting, out, N, C, B, seed=7, progress=False)
    assert calls == [[13, 14, 15], [16]]  # only the two unfinished batches are redone
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [f"{i:06d}.png" for i in range(N)]  # exactly N, no tmp files, no duplicates
    np.testing.assert_array_equal(_read_pngs(out / "images", N), _read_pngs(ref / "images", N))
    calls.clear()
    S.generate_samples(counting, out, N, C, B, seed=7, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="seed"):  # a rerun with other settings into the same folder is refused
        S.generate_samples(counting, out, N, C, B, seed=8, progress=False)


def test_npz_equals_pngs_labels_and_resize(tmp_path):
    out = tmp_path / "s"
    npz = S.generate_samples(per_image_sample_fn, out, N, C, B, seed=0, resize_to=8, progress=False)
    with np.load(npz) as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    np.testing.assert_array_equal(arr, _read_pngs(out / "images", N))
    assert labels.tolist() == [i % C for i in range(N)]
    # LlamaGen resize: bicubic on the float tensor, then clamp + uint8
    x = per_image_sample_fn(torch.tensor([4 % C]), [4])
    want = M.to_uint8(torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic", align_corners=False))
    np.testing.assert_array_equal(arr[4], want[0].permute(1, 2, 0).numpy())
    assert json.loads((out / S.CONFIG_NAME).read_text())["resize_to"] == 8
    with pytest.raises(ValueError, match=r"sample_fn must return"):
        S.sample_to_folder(lambda l, s: torch.zeros(len(s), 12, 12), tmp_path / "bad", 2, C, 2)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    return M.save_random_inception_weights(tmp_path_factory.mktemp("inc") / "random_inception.pth", seed=0)


def test_evaluate_and_cli_on_npz(tmp_path, random_inception, capsys):
    n = 4
    smp = S.generate_samples(per_image_sample_fn, tmp_path / "s", n, C, B, seed=0, progress=False)
    ref_dir = tmp_path / "ref_pngs"
    S.sample_to_folder(per_image_sample_fn, ref_dir, n, C, B, seed=1000, progress=False)
    inc = M.InceptionFeatures(random_inception, batch_size=8)
    res = S.evaluate_samples(smp, ref_dir, inc, cache_dir=tmp_path)
    pool, logits = inc(M.iter_batches(np.concatenate([M.load_npz_images(smp), _read_pngs(ref_dir, n)]), 8))
    pool_s, logits_s, pool_r = pool[:n], logits[:n], pool[n:]
    fid = M.frechet_distance_to_features(pool_s, *M.feature_statistics(pool_r))
    assert fid > 0 and res["fid"] == pytest.approx(fid, rel=1e-4)
    assert res["inception_score"] == pytest.approx(M.inception_score(logits=logits_s, splits=n)[0], rel=1e-6)
    assert (res["precision"], res["recall"]) == pytest.approx(M.precision_recall(pool_r, pool_s, k=3))
    assert res["num_images"] == n and res["num_ref_images"] == n and res["is_splits"] == n

    # CLI on an existing npz vs a reference npz carrying mu/sigma (like VIRTUAL_imagenet256_labeled.npz):
    # FID must use the stored statistics, precision/recall the stored arr_0 images.
    ref_npz = tmp_path / "ref.npz"
    mu, sigma = M.feature_statistics(pool_r + 1.0)  # deliberately not the statistics of arr_0
    np.savez(ref_npz, arr_0=_read_pngs(ref_dir, n), mu=mu, sigma=sigma)
    assert EG.main(["--samples", str(smp), "--ref", str(ref_npz), "--inception-weights", str(random_inception),
                   "--out", str(tmp_path / "eval")]) == 0
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert got["fid"] == pytest.approx(M.frechet_distance_to_features(pool_s, mu, sigma), rel=1e-4)
    assert got["precision"] == pytest.approx(res["precision"]) and got["recall"] == pytest.approx(res["recall"])
    assert "fid" in capsys.readouterr().out


def test_cli_help_and_loud_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        EG.main(["--help"])
    assert "accelerate launch --num_processes 8 -m pipelines.evaluate_generation" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exactly one of --pipeline"):
        EG.main(["--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        EG.main(["--samples", "x.npz", "--ref", "r.npz", "--inception-weights", str(tmp_path / "none.pth"),
                "--out", str(tmp_path)])


def test_cli_samples_from_a_real_tiny_pipeline(tmp_path):
    from generator import GPT
    from pipelines import MGVQPipeline
    from tokenizer import MGVQTokenizer

    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    gpt = GPT.from_preset("GPT-tiny", groups=tok.config.groups, codebook_size=tok.config.codebook_size, grid=8,
                          num_classes=10, head="parallel")
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # zero-initialised head -> give samples some variety
    pipe = MGVQPipeline(tok, gpt.eval(), id2label=[str(i) for i in range(10)])
    pipe.save_pretrained(str(tmp_path / "pipe"))
    args = ["--pipeline", str(tmp_path / "pipe"), "--num-images", "5", "--batch-size", "3", "--guidance-scale", "1.5",
            "--top-k", "64", "--seed", "10"]
    assert EG.main(args + ["--out", str(tmp_path / "a")]) == 0
    with np.load(tmp_path / "a" / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.shape == (5, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    # image i has its own generator seeded with seed + i: images 3 and 4, whatever batch they were made in
    pipe = MGVQPipeline.from_pretrained(str(tmp_path / "pipe"))
    want = pipe([3, 4], guidance_scale=1.5, top_k=64, generator=[torch.Generator().manual_seed(s) for s in (13, 14)],
                output_type="pt", progress=False).images
    np.testing.assert_array_equal(arr[3:], M.nchw_to_nhwc(M.to_uint8(want)))
    assert json.loads((tmp_path / "a" / S.CONFIG_NAME).read_text())["guidance_scale"] == 1.5
    assert EG.main(args + ["--resize-to", "16", "--out", str(tmp_path / "b")]) == 0
    assert M.load_npz_images(tmp_path / "b" / "samples.npz").shape == (5, 16, 16, 3)


def test_classifier_feature_net_through_the_cli(tmp_path, capsys):
    """--feature-net DIR: a classifier of the generator's classes scores the samples; FD, accuracy, classifier score
    and precision / recall equal the hand-computed values; images/s is the sampler's speed; bad folders are refused."""
    from generator import GPT
    from pipelines import MGVQPipeline
    from pipelines.classifier import ClassifierConfig, SmallCNN, classifier_fd, predict, save_classifier
    from tokenizer import MGVQTokenizer

    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    gpt = GPT.from_preset("GPT-tiny", groups=tok.config.groups, codebook_size=tok.config.codebook_size, grid=8,
                          num_classes=3, head="parallel")
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    MGVQPipeline(tok, gpt.eval(), id2label=["a", "b", "c"]).save_pretrained(str(tmp_path / "pipe"))
    clf = SmallCNN(ClassifierConfig(num_classes=3, image_size=32, width=4, feature_dim=8)).eval()
    for m in clf.modules():  # random but non-degenerate features
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.5)
    save_classifier(clf, str(tmp_path / "clf"))
    ref = (np.random.default_rng(0).random((12, 32, 32, 3)) * 255).astype(np.uint8)
    M.save_npz(tmp_path / "ref.npz", ref)

    n = 9
    args = ["--pipeline", str(tmp_path / "pipe"), "--num-images", str(n), "--batch-size", "4", "--guidance-scale",
            "2.0", "--ref", str(tmp_path / "ref.npz"), "--feature-net", str(tmp_path / "clf"), "--out",
            str(tmp_path / "e")]
    assert EG.main(args) == 0
    got = json.loads((tmp_path / "e" / "metrics.json").read_text())
    with np.load(tmp_path / "e" / "samples.npz") as f:
        samples, labels = f["arr_0"], f["arr_1"]
    logits, feats = predict(clf, torch.from_numpy(samples).permute(0, 3, 1, 2))
    _, ref_feats = predict(clf, torch.from_numpy(ref).permute(0, 3, 1, 2))
    assert got["feature_net"] == f"classifier:{tmp_path / 'clf'}" and got["num_images"] == n
    assert got["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))
    assert got["fd"] == pytest.approx(classifier_fd(ref_feats, feats), rel=1e-5) and got["fd"] > 0
    assert got["classifier_score"] == pytest.approx(M.inception_score(logits=logits.numpy(), splits=n)[0], rel=1e-5)
    assert (got["precision"], got["recall"]) == pytest.approx(M.precision_recall(ref_feats.numpy(), feats.numpy()))
    assert "fid" not in got and "inception_score" not in got  # Inception's numbers only from Inception
    assert "inception_weights" not in got and got["images_per_s"] > 0
    assert "accuracy" in capsys.readouterr().out
    # a rerun into the same folder samples nothing and keeps the measured speed
    speed = got["images_per_s"]
    assert EG.main(args) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["images_per_s"] == speed
    with pytest.raises(FileNotFoundError, match="--feature-net=.*valid: 'inception', or a classifier folder"):
        EG.main(args[:-4] + ["--feature-net", str(tmp_path / "pipe"), "--out", str(tmp_path / "f")])
