"""Image data: LlamaGen crops, robust decoding, folders / datasets / Fashion-MNIST, resumable sampling."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.data import (ImageFolderDataset, ImageTransform, ResumableBatchSampler,
                            build_dataset, center_crop_arr, collate,
                            load_rgb, random_crop_arr, skimage_crops, to_rgb)


def test_random_crop_arr_box_then_crop_hand_value():
    base = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = base.repeat(2, 0).repeat(2, 1)  # 64 x 64 of constant 2x2 blocks
    img = Image.fromarray(a)
    # crop fraction fixed to 1.0: short side 32 -> one BOX halving (64 >= 2*32), no further resize, full crop
    out = random_crop_arr(img, 32, random.Random(0), min_crop_frac=1.0, max_crop_frac=1.0)
    np.testing.assert_array_equal(out, base)
    # default 0.8-1.0: the short side is drawn from [32, 40], the crop is a window of that resize
    sizes = set()
    for seed in range(40):
        rng = random.Random(seed)
        s = random.Random(seed).randrange(32, 41)
        sizes.add(s)
        assert random_crop_arr(img, 32, rng).shape == (32, 32, 3)
    assert min(sizes) == 32 and max(sizes) == 40


def test_center_crop_arr_hand_value():
    a = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(a), 40)  # no resize needed: centre 40 columns
    np.testing.assert_array_equal(out, a[:, 20:60])


def test_transform_range_and_flip():
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = 255
    t = ImageTransform(32, "resize", hflip=True)
    outs = [t(Image.fromarray(a), random.Random(s)) for s in range(8)]
    assert all(o.shape == (3, 32, 32) and o.min() == -1 and o.max() == 1 for o in outs)
    left = [o[0, 0, 0].item() for o in outs]
    assert set(left) == {-1.0, 1.0}  # some flipped, some not
    with pytest.raises(ValueError, match="augmentation must be one of"):
        ImageTransform(32, "zoom")


def test_mode_conversions(tmp_path):
    g = to_rgb(Image.fromarray(np.full((4, 4), 77, np.uint8), "L"))
    assert g.mode == "RGB" and np.asarray(g)[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half transparent -> white
    c = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert c[0, 0].tolist() == [200, 0, 0] and c[3, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 255))))[0, 0].tolist() == [0, 0, 0]
    # 16-bit greyscale PNG on disk: 65535 -> 255, 32768 -> 128
    a16 = np.array([[65535, 32768], [0, 257]], np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    got = np.asarray(load_rgb(tmp_path / "g16.png"))[..., 0]
    assert got.tolist() == [[255, 128], [0, 1]]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    assert np.asarray(to_rgb(pal)).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def _write_bad_folder(root, photos):
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(photos[2][:64, :64]).save(root / "cats" / "a_good.png")
    buf = root / "cats" / "b_trunc.jpg"
    Image.fromarray(photos[0][:128, :128]).save(buf, quality=95)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 2])  # truncated JPEG
    (root / "cats" / "c_zero.png").write_bytes(b"")
    (root / "dogs" / "d_text.jpg").write_text("this is not an image")
    Image.fromarray(photos[1][:64, :64]).convert("L").save(root / "dogs" / "e_grey.png")
    Image.fromarray(photos[3][:64, :64]).convert("CMYK").save(root / "dogs" / "f_cmyk.jpg")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension")


def test_folder_counts_and_skips_bad_files(tmp_path, photos):
    _write_bad_folder(tmp_path, photos)
    ds = ImageFolderDataset(tmp_path, ImageTransform(32, "center_crop", hflip=False))
    assert ds.layout == "imagenet" and ds.class_names == ["cats", "dogs"] and len(ds) == 6
    assert ds.labels == [0, 0, 0, 1, 1, 1]
    good, bad = ds.scan()
    assert good == 3 and bad == [1, 2, 3]
    items = [ds[i] for i in range(6)]
    # item 1 tries 1, 2, 3 (all bad) and returns 4; items 2 and 3 skip the already-known bad files without recount
    assert [it["failed"] for it in items] == [0, 3, 0, 0, 0, 0]
    # items 1, 2 and 3 were all replaced by item 4 (the grey image, label 1)
    for i in (1, 2, 3):
        assert torch.equal(items[i]["image"], items[4]["image"]) and items[i]["label"] == 1
    assert ds.failures == 3  # each bad file is decoded (and counted) once
    grey = items[4]["image"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    batch = collate(items)
    assert batch["image"].shape == (6, 3, 32, 32) and batch["failed"] == 3
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_flat_folder_and_errors(tmp_path, photos):
    for k in range(3):
        Image.fromarray(photos[k][:40, :40]).save(tmp_path / f"{k}.png")
    ds = build_dataset(str(tmp_path), 32, train=True)
    assert ds.layout == "flat" and len(ds) == 3 and ds.labels == [0, 0, 0]
    assert ds[(0, 123)]["image"].shape == (3, 32, 32)
    assert torch.equal(ds[(1, 5)]["image"], ds[(1, 5)]["image"])  # same seed -> same augmentation
    with pytest.raises(FileNotFoundError, match="is not 'skimage', an image folder, a folder of IDX files"):
        build_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="no images with extensions"):
        ImageFolderDataset(tmp_path / "empty", ImageTransform(32))


def test_hf_datasets_sources(tmp_path, photos):
    import datasets

    files = []
    for k in range(4):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(photos[k][:48, :48]).save(p)
        files.append(p.read_bytes())
    files[2] = b"\x89PNG broken"
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in files], "label": [0, 1, 2, 3]},
                                    features=feats)
    ds.save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "pq" / "train-0.parquet"))
    for src in (str(tmp_path / "disk"), str(tmp_path / "pq"), str(tmp_path / "pq" / "train-0.parquet")):
        d = build_dataset(src, 32, train=False)
        assert len(d) == 4 and d.class_names == ["a", "b", "c", "d"]
        good, bad = d.scan()
        assert (good, bad) == (3, [2])
        it = d[2]
        assert it["failed"] == 1 and it["label"] == 3 and it["image"].shape == (3, 32, 32)


def test_idx_folder_source_and_the_demo_fashion_mnist_reader():
    from pipelines.fashion_mnist import CLASSES, find_fashion_mnist, load_fashion_mnist

    try:
        folder = find_fashion_mnist(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed here: {e}")
    images, labels, names = load_fashion_mnist("test", folder)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10 and names == CLASSES
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published t10k label order (ankle boot, pullover, ...)
    ds = build_dataset(str(folder), 32, train=False)  # tokenizer.data: any folder of IDX files, split "test"
    it = ds[0]
    x = it["image"]
    assert x.shape == (3, 32, 32) and it["label"] == 9 and ds.class_names == [str(i) for i in range(10)]
    assert torch.equal(x[0], x[1]) and -1 <= x.min() < x.max() <= 1
    assert build_dataset(str(folder), 32, train=False, class_names=CLASSES).class_names == CLASSES
    with pytest.raises(ValueError, match="no longer a built-in name; pass its folder of IDX files"):
        build_dataset("fashion-mnist:test", 32)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist|not found in"):
        find_fashion_mnist("/nonexistent", download=False)


def test_skimage_crops_are_real_photos():
    imgs, labels = skimage_crops(16, 32, seed=0)
    assert imgs.shape == (16, 32, 32, 3) and imgs.dtype == np.uint8
    assert imgs.std() > 20  # real image content, not flat
    again, _ = skimage_crops(16, 32, seed=0)
    np.testing.assert_array_equal(imgs, again)


def test_resumable_sampler_resume_and_sharding():
    s = ResumableBatchSampler(50, 4, seed=3)
    it = iter(s)
    full = [next(it) for _ in range(30)]
    resumed = iter(ResumableBatchSampler(50, 4, seed=3, start_step=17))
    assert [next(resumed) for _ in range(13)] == full[17:]
    assert s.steps_per_epoch == 12
    epoch0 = [i for b in full[:12] for i, _ in b]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert full[0] != full[12]  # a new permutation / augmentation seeds in epoch 1
    r0, r1 = ResumableBatchSampler(50, 4, 3, 0, 2), ResumableBatchSampler(50, 4, 3, 1, 2)
    b0, b1 = r0.batch(5), r1.batch(5)
    assert not set(i for i, _ in b0) & set(i for i, _ in b1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 4, world_size=2)
