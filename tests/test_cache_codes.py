"""tokenizer.cache_codes: codes == tokenizer.encode of the same crops, resume after SIGKILL, 2 processes, refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tokenizer import MGVQTokenizer
from tokenizer.cache_codes import code_dtype, main, make_views
from tokenizer.data import center_crop_arr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "fish"]
BAD = {"dog/broken.jpg", "fish/garbage.png"}


def _files(root):
    return [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    tok.save_pretrained(str(base / "tok"))
    rng = np.random.default_rng(0)
    root = base / "images"
    order = []  # (relative path, label) in the sorted order the folder source uses
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(4):
            h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            # smooth random images (noise upsampled), so crops and flips give different codes
            small = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
            if j == 1:
                img = img.convert("L")  # greyscale input is converted to RGB
            ext = "png" if j % 2 else "jpg"
            img.save(root / name / f"img{j}.{ext}")
    good = np.asarray(Image.open(root / "cat" / "img0.jpg"))
    buf = (root / "cat" / "img0.jpg").read_bytes()
    (root / "dog" / "broken.jpg").write_bytes(buf[: len(buf) // 3])  # truncated JPEG
    (root / "fish" / "garbage.png").write_bytes(os.urandom(300))  # not an image at all
    for c, name in enumerate(CLASSES):
        for fn in sorted(os.listdir(root / name)):
            order.append((f"{name}/{fn}", c))
    assert good.shape[2] == 3
    ref = base / "ref"
    assert main(["--tokenizer", str(base / "tok"), "--data", str(root), "--out", str(ref), "--shard-size", "4",
                 "--batch-size", "3", "--num-workers", "0"]) == 0
    return dict(base=base, tok=tok, root=root, order=order, ref=ref)


def read_rows(out):
    """All rows of a shard dir as {index: (codes, label)}; asserts no index appears twice."""
    meta = json.load(open(os.path.join(out, "meta.json")))
    rows = {}
    for s in meta["shards"]:
        t = pq.read_table(os.path.join(out, s)).to_pydict()
        for codes, label, idx in zip(t["codes"], t["label"], t["index"]):
            assert idx not in rows, f"index {idx} written twice"
            rows[idx] = (np.asarray(codes), label)
    return meta, rows


def _encode(tok, arrays):
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return tok.encode(x).numpy()


def test_codes_equal_encode_of_crops_and_flips(setup):
    tok, root, order = setup["tok"], setup["root"], setup["order"]
    meta, rows = read_rows(setup["ref"])
    assert (meta["groups"], meta["codebook_size"], meta["grid"], meta["dtype"]) == (4, 256, [8, 8], "uint8")
    assert meta["views"]["count"] == 2 and meta["class_names"] == CLASSES and meta["complete"] is True
    bad_idx = sorted(i for i, (p, _) in enumerate(order) if p in BAD)
    assert meta["counts"] == {"images": 14, "written": 12, "skipped": 2, "skipped_indices": bad_idx}
    assert meta["tokenizer"]["config"]["groups"] == 4 and len(meta["tokenizer"]["weights_sha256"]) == 64
    feats = pq.read_schema(os.path.join(setup["ref"], meta["shards"][0])).metadata[b"huggingface"].decode()
    assert '"Array4D"' in feats and '"uint8"' in feats and '"ClassLabel"' in feats

    good = [(i, p, c) for i, (p, c) in enumerate(order) if p not in BAD]
    assert sorted(rows) == [i for i, _, _ in good]
    crops = [np.asarray(center_crop_arr(Image.open(root / p).convert("RGB"), 32)) for _, p, _ in good]
    want_center = _encode(tok, crops)
    want_flip = _encode(tok, [a[:, ::-1] for a in crops])
    for n, (i, p, c) in enumerate(good):
        codes, label = rows[i]
        assert codes.shape == (2, 8, 8, 4) and label == c
        np.testing.assert_array_equal(codes[0], want_center[n], err_msg=f"centre view of {p}")
        np.testing.assert_array_equal(codes[1], want_flip[n], err_msg=f"flip view of {p}")
    assert not np.array_equal(want_center, want_flip)  # the flip view is a different view


def test_ten_crop_views_match_torchvision():
    from torchvision.transforms import functional as TF

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    v = make_views(img, 32, "ten-crop")
    assert v.shape == (20, 3, 32, 32) and v.dtype == np.uint8
    want = [np.asarray(c) for r in (1.1, 1.05)
            for c in TF.ten_crop(Image.fromarray(center_crop_arr(img, int(32 * r))), 32)]
    np.testing.assert_array_equal(v, np.stack(want).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(v[5], v[1][:, :, ::-1])  # top-left of the flipped image = flipped top-right


def test_code_dtype():
    assert [code_dtype(k) for k in (2, 256, 257, 16384, 32768, 32769, 2 ** 20)] == \
           ["uint8", "uint8", "int16", "int16", "int16", "int32", "int32"]


def _cli(out, setup, *extra):
    return [sys.executable, "-m", "tokenizer.cache_codes", "--tokenizer", str(setup["base"] / "tok"),
            "--data", str(setup["root"]), "--out", str(out), "--batch-size", "3", "--num-workers", "0", *extra]


def test_resume_after_sigkill_gives_the_same_rows(setup):
    _, ref_rows = read_rows(setup["ref"])
    out = setup["base"] / "killed"
    cmd = [sys.executable, "tests/_kill_after_shards.py", "2", *_cli(out, setup, "--shard-size", "4")[3:]]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]  # SIGKILLed after its 2nd shard
    done = sorted(os.listdir(out / "data"))
    assert done == ["codes-00000-of-00004.parquet", "codes-00001-of-00004.parquet"]
    assert json.load(open(out / "meta.json"))["complete"] is False
    mtimes = {f: os.stat(out / "data" / f).st_mtime_ns for f in done}
    (out / "data" / ".tmp-424242-codes-00003-of-00004.parquet").write_bytes(b"partial write of a killed run")
    with pytest.raises(ValueError, match="complete=false"):
        from generator.data import CodeShardDataset

        CodeShardDataset(str(out))

    assert main(_cli(out, setup, "--shard-size", "4")[3:]) == 0
    assert sorted(os.listdir(out / "data")) == [f"codes-0000{k}-of-00004.parquet" for k in range(4)]
    assert {f: os.stat(out / "data" / f).st_mtime_ns for f in done} == mtimes  # not rewritten
    meta, rows = read_rows(out)  # read_rows asserts no duplicates
    assert meta["complete"] and meta["counts"]["written"] == 12 and sorted(rows) == sorted(ref_rows)
    for i, (codes, label) in rows.items():
        np.testing.assert_array_equal(codes, ref_rows[i][0])
        assert label == ref_rows[i][1]


def test_two_processes_write_disjoint_shards_whose_union_is_the_dataset(setup):
    _, ref_rows = read_rows(setup["ref"])
    out = setup["base"] / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           *_cli(out, setup, "--shard-size", "3")[1:]]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0/2 wrote shards [0, 2, 4]" in p.stderr and "rank 1/2 wrote shards [1, 3]" in p.stderr
    meta, rows = read_rows(out)  # no duplicates
    assert meta["complete"] and meta["num_shards"] == 5 and meta["counts"]["skipped"] == 2
    for k, s in enumerate(meta["shards"]):  # shard k holds exactly the (readable) images [3k, 3k+3)
        idx = pq.read_table(out / s, columns=["index"]).column("index").to_pylist()
        assert set(idx) <= set(range(3 * k, 3 * k + 3)) and idx == sorted(idx)
    assert sorted(rows) == sorted(ref_rows)
    for i in rows:
        np.testing.assert_array_equal(rows[i][0], ref_rows[i][0])


def test_refuses_shards_of_another_tokenizer_or_other_settings(setup):
    torch.manual_seed(1)
    other = setup["base"] / "other_tok"
    MGVQTokenizer.from_preset("mgvq-tiny").save_pretrained(str(other))
    args = ["--data", str(setup["root"]), "--out", str(setup["ref"]), "--shard-size", "4", "--num-workers", "0"]
    with pytest.raises(ValueError, match="another tokenizer.*weights_sha256"):
        main(["--tokenizer", str(other), *args])
    with pytest.raises(ValueError, match="views="):
        main(["--tokenizer", str(setup["base"] / "tok"), *args, "--views", "ten-crop"])
    with pytest.raises(ValueError, match="shard_size="):
        main(["--tokenizer", str(setup["base"] / "tok"), *args[:-4], "--shard-size", "5"])


def test_datasets_sources_saved_and_parquet(setup):
    """The same images as a `datasets` Dataset (save_to_disk, Parquet) give the same rows; bad bytes are skipped."""
    import datasets

    root, order = setup["root"], setup["order"]
    _, ref_rows = read_rows(setup["ref"])
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": (root / p).read_bytes(), "path": None} for p, _ in order],
         "label": [c for _, c in order]}, features=feats)
    ds.save_to_disk(str(setup["base"] / "saved"))
    os.makedirs(setup["base"] / "pq")
    ds.to_parquet(str(setup["base"] / "pq" / "train-00000.parquet"))
    for src in ("saved", "pq"):
        out = setup["base"] / f"out_{src}"
        assert main(["--tokenizer", str(setup["base"] / "tok"), "--data", str(setup["base"] / src), "--out", str(out),
                     "--num-workers", "0", "--batch-size", "7"]) == 0
        meta, rows = read_rows(out)
        assert meta["class_names"] == CLASSES and meta["counts"]["skipped"] == 2
        assert sorted(rows) == sorted(ref_rows)
        for i in rows:
            np.testing.assert_array_equal(rows[i][0], ref_rows[i][0])
            assert rows[i][1] == ref_rows[i][1]


def test_code_shard_dataset_reads_the_cache(setup):
    from generator.data import CodeShardDataset

    _, rows = read_rows(setup["ref"])
    ds = CodeShardDataset(str(setup["ref"]), groups=4, codebook_size=256, grid=(8, 8), view=1)
    assert len(ds) == 12 and ds.class_names == CLASSES
    order = sorted(rows)  # one shard after another, rows in index order
    for n in (0, 5, 11):
        codes, label = ds[n]
        assert codes.dtype == torch.int64 and codes.shape == (8, 8, 4) and label.dtype == torch.int64
        np.testing.assert_array_equal(codes.numpy(), rows[order[n]][0][1])
        assert int(label) == rows[order[n]][1]


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--tokenizer runs/tok/final --data /usr/share/datasets/fashion-mnist" in out


def test_idx_folder_source_and_the_deprecated_fashion_mnist_name(tmp_path):
    """--data <folder of IDX files> (the demo passes its Fashion-MNIST folder); the old `--data fashion-mnist
    --data-path DIR` spelling still resolves to that folder, with a deprecation message."""
    import shutil as _sh
    from pathlib import Path

    from tokenizer import cache_codes as cc
    from tokenizer.data import legacy_source

    src = Path("/usr/share/datasets/fashion-mnist")
    if not src.is_dir():
        pytest.skip("Debian dataset-fashion-mnist not installed")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cc.open_source(str(tmp_path / "nowhere"), "test")
    mine = tmp_path / "fm"
    _sh.copytree(src, mine)
    ds, desc = cc.open_source(str(mine), "test")
    assert len(ds) == 10000 and desc["data"] == str(mine) and desc["kind"] == "ArrayImageDataset"
    with pytest.warns(FutureWarning, match="deprecated"):
        assert legacy_source("fashion-mnist:test", str(mine)) == (str(mine), "test")


def test_a_shard_of_only_unreadable_images_does_not_stop_stage_two(setup, tmp_path):
    """Found with bad data: every image of one shard unreadable -> that shard has no rows; it is listed under
    meta.json `empty_shards` (not `shards`), so the generator's dataset still reads the folder."""
    import shutil

    from generator.data import CodeShardDataset

    root = tmp_path / "images"
    shutil.copytree(setup["root"], root)
    for p in sorted((root / "fish").iterdir()):  # the 5 files of class fish (indices 9..13): all broken
        p.write_bytes(b"not an image")
    out = tmp_path / "codes"
    assert main(["--tokenizer", str(setup["base"] / "tok"), "--data", str(root), "--out", str(out), "--shard-size",
                 "4", "--num-workers", "0", "--batch-size", "4"]) == 0
    meta = json.load(open(out / "meta.json"))
    assert meta["empty_shards"] == ["data/codes-00003-of-00004.parquet"]  # images 12, 13: both fish
    assert len(meta["shards"]) == 3 and meta["counts"]["written"] == 8  # 14 - dog/broken.jpg - 5 fish
    ds = CodeShardDataset(str(out))
    assert len(ds) == 8 and ds[7][0].shape == (8, 8, 4)
    # a rerun (resume) sees the empty shard as done and rewrites nothing
    assert main(["--tokenizer", str(setup["base"] / "tok"), "--data", str(root), "--out", str(out), "--shard-size",
                 "4", "--num-workers", "0"]) == 0
    assert json.load(open(out / "meta.json"))["empty_shards"] == meta["empty_shards"]


def test_run_takes_typed_keyword_arguments(setup, tmp_path):
    from tokenizer.cache_codes import run

    stats = run(tokenizer=str(setup["base"] / "tok"), data=str(setup["root"]), out=str(tmp_path / "c"),
                shard_size=8, num_workers=0, limit=5, class_names=["a", "b", "c"])
    meta = json.load(open(tmp_path / "c" / "meta.json"))
    assert stats["complete"] and meta["class_names"] == ["a", "b", "c"] and meta["counts"]["images"] == 5
    with pytest.raises(ValueError, match=r"--batch-size=0: must be >= 1"):
        run(tokenizer=str(setup["base"] / "tok"), data=str(setup["root"]), out=str(tmp_path / "d"), batch_size=0)
