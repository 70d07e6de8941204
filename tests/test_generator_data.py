"""generator.data.CodeShardDataset on hand-written shards (no tokenizer involved)."""
import json
import os
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from generator.data import CodeShardDataset, build_loader, set_epoch

CLASSES = ["a", "b", "c"]


def write_shards(out, n=50, V=3, h=4, w=4, G=2, K=1000, dtype="int16", shard_size=16, complete=True):
    """Shards in the cache_codes layout; codes[i, v] = (i * 7 + v) % K everywhere, plus a position pattern."""
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    feats = datasets.Features({"codes": datasets.Array4D(shape=(V, h, w, G), dtype=dtype),
                               "label": datasets.ClassLabel(names=CLASSES), "index": datasets.Value("int64")})
    pos = np.arange(h * w * G).reshape(h, w, G)
    names = []
    for k, s in enumerate(range(0, n, shard_size)):
        idx = np.arange(s, min(s + shard_size, n))
        codes = ((idx[:, None, None, None, None] * 7 + np.arange(V)[None, :, None, None, None] + pos) % K)
        ds = datasets.Dataset.from_dict({"codes": codes.astype(dtype), "label": idx % 3, "index": idx},
                                        features=feats)
        name = f"data/codes-{k:05d}-of-{(n + shard_size - 1) // shard_size:05d}.parquet"
        pq.write_table(ds.data.table, os.path.join(out, name))
        names.append(name)
    meta = {"format": "mgvq-codes", "version": 1, "groups": G, "codebook_size": K, "grid": [h, w], "dtype": dtype,
            "views": {"mode": "test", "count": V, "names": [f"v{v}" for v in range(V)]}, "class_names": CLASSES,
            "num_classes": 3, "shards": names, "counts": {"images": n, "written": n, "skipped": 0},
            "complete": complete}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return pos


def expected(i, v, pos, K=1000):
    return (i * 7 + v + pos) % K


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    pos = write_shards(out)
    return out, pos


def test_items_shapes_dtypes_values(shards):
    out, pos = shards
    ds = CodeShardDataset(out, groups=2, codebook_size=1000, grid=4, view=2, cache_dir=os.path.join(out, "cache"))
    assert len(ds) == 50 and ds.meta["views"]["count"] == 3 and ds.class_names == CLASSES
    for i in (0, 17, 49, -1):
        codes, label = ds[i]
        j = i % 50
        assert codes.dtype == torch.int64 and codes.shape == (4, 4, 2) and label.dtype == torch.int64
        np.testing.assert_array_equal(codes.numpy(), expected(j, 2, pos))  # values > 255 survive (int16)
        assert int(label) == j % 3
    with pytest.raises(IndexError):
        ds[50]


def test_random_views_seeded_and_per_epoch(shards):
    out, pos = shards
    ds = CodeShardDataset(out, view="random", seed=3)

    def views():
        return [int((ds[i][0].numpy() - pos - i * 7)[0, 0, 0] % 1000) for i in range(50)]

    e0 = views()
    assert e0 == views()  # a pure function of (seed, epoch, index)
    assert set(e0) == {0, 1, 2}
    ds.set_epoch(1)
    e1 = views()
    assert e1 != e0 and set(e1) == {0, 1, 2}
    assert e0 == [int(v) for v in CodeShardDataset(out, view="random", seed=3)._views(np.arange(50))]
    torch.manual_seed(0)
    unseeded = CodeShardDataset(out)  # seed=None: torch RNG
    assert len({int((unseeded[5][0].numpy() - pos - 35)[0, 0, 0] % 1000) for _ in range(30)}) == 3


def test_loader_batches_and_epochs(shards):
    out, pos = shards
    ds = CodeShardDataset(out, view=0)
    loader = build_loader(ds, batch_size=8, shuffle=True, seed=0)
    seen = []
    for epoch in range(2):
        set_epoch(loader, epoch)
        batches = list(loader)
        assert len(batches) == 6  # 50 // 8, drop_last
        codes, labels = batches[0]
        assert codes.shape == (8, 4, 4, 2) and codes.dtype == torch.int64 and labels.dtype == torch.int64
        order = [int(c[0, 0, 0]) // 7 for b, _ in batches for c in b]  # codes[i, 0][0, 0, 0] = 7 i
        for (b, y) in batches:
            for c, lab in zip(b, y):
                i = int(c[0, 0, 0]) // 7
                np.testing.assert_array_equal(c.numpy(), expected(i, 0, pos))
                assert int(lab) == i % 3
        assert len(set(order)) == 48
        seen.append(order)
    assert seen[0] != seen[1]  # reshuffled each epoch


def test_distributed_sampler_path(shards, tmp_path):
    out, _ = shards
    ds = CodeShardDataset(out, view=1)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        build_loader(ds, 4, distributed=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = build_loader(ds, 4, distributed=True, seed=1)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        set_epoch(loader, 3)
        assert loader.sampler.epoch == 3 and ds.epoch == 3
        assert sum(len(y) for _, y in loader) == 48
    finally:
        torch.distributed.destroy_process_group()


def test_mismatch_errors_name_both_values(shards):
    out, _ = shards
    with pytest.raises(ValueError, match=r"groups \(G\) mismatch: the generator expects 4 .* have 2"):
        CodeShardDataset(out, groups=4)
    with pytest.raises(ValueError, match=r"codebook_size \(K\) mismatch: the generator expects 16384 .* have 1000"):
        CodeShardDataset(out, codebook_size=16384)
    with pytest.raises(ValueError, match=r"grid \(h, w\) mismatch: the generator expects \(16, 16\) .* \(4, 4\)"):
        CodeShardDataset(out, grid=16)
    cfg = SimpleNamespace(groups=2, codebook_size=1000, grid=8, num_classes=10)
    with pytest.raises(ValueError, match=r"grid .* \(8, 8\)"):
        CodeShardDataset(out, config=cfg)
    with pytest.raises(ValueError, match="num_classes mismatch: the generator has 2 classes"):
        CodeShardDataset(out, config=SimpleNamespace(groups=2, codebook_size=1000, grid=4, num_classes=2))
    assert len(CodeShardDataset(out, config=SimpleNamespace(groups=2, codebook_size=1000, grid=4,
                                                             num_classes=10))) == 50
    with pytest.raises(ValueError, match=r"view=3: expected 'random' or an int in \[0, 3\)"):
        CodeShardDataset(out, view=3)
    with pytest.raises(ValueError, match="view='center'"):
        CodeShardDataset(out, view="center")


def test_gptconfig_object(shards):
    from generator import GPTConfig

    out, _ = shards
    ok = GPTConfig(dim=64, n_layer=1, n_head=4, grid=4, groups=2, codebook_size=1000, num_classes=3)
    assert len(CodeShardDataset(out, config=ok)) == 50
    bad = GPTConfig(dim=64, n_layer=1, n_head=4, grid=4, groups=4, codebook_size=1000, num_classes=3)
    with pytest.raises(ValueError, match="groups"):
        CodeShardDataset(out, config=bad)


def test_incomplete_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a code-shard directory"):
        CodeShardDataset(str(tmp_path))
    write_shards(str(tmp_path / "x"), n=10, complete=False)
    with pytest.raises(ValueError, match="complete=false"):
        CodeShardDataset(str(tmp_path / "x"))
    write_shards(str(tmp_path / "y"), n=10)
    os.remove(tmp_path / "y" / "data" / "codes-00000-of-00001.parquet")
    with pytest.raises(FileNotFoundError, match="missing"):
        CodeShardDataset(str(tmp_path / "y"))


def test_uint8_codes(tmp_path):
    pos = write_shards(str(tmp_path), n=20, V=2, G=4, K=256, dtype="uint8", shard_size=8)
    ds = CodeShardDataset(str(tmp_path), groups=4, codebook_size=256, grid=(4, 4), view=1)
    codes, _ = ds[13]
    assert codes.dtype == torch.int64
    np.testing.assert_array_equal(codes.numpy(), expected(13, 1, pos, K=256))
