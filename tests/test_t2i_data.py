"""Caption shards: cache-codes stores captions (sidecar .txt / a datasets column) and T5 caption features (float16,
with lengths) next to the codes, resumably; generator.data reads them back left-padded with masks."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from _t5 import make_tiny_t5
from generator.data import CodeShardDataset
from pipelines.text_encoder import T5TextEncoder
from tokenizer import MGVQTokenizer
from tokenizer.cache_codes import run

WORDS = {"cat": ["a small cat", "a photo of a cat sitting"], "dog": ["dog", "a big brown dog running in the park"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("capshards")
    torch.manual_seed(0)
    MGVQTokenizer.from_preset("mgvq-tiny").eval().save_pretrained(str(base / "tok"))
    rng = np.random.default_rng(0)
    caps = {}
    for name, texts in WORDS.items():
        (base / "img" / name).mkdir(parents=True)
        for j, text in enumerate(texts * 2):
            p = base / "img" / name / f"{j}.png"
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(p)
            (base / "img" / name / f"{j}.txt").write_text(f"  {text}\n")
            caps[f"{name}/{j}.png"] = text
    enc = T5TextEncoder.from_pretrained(make_tiny_t5(base / "t5", [t for v in WORDS.values() for t in v]),
                                        max_length=6, device="cpu")
    return dict(base=base, caps=caps, enc=enc)


def _run(setup, out, **kw):
    b = setup["base"]
    return run(tokenizer=str(b / "tok"), data=str(b / "img"), out=str(out), shard_size=3, batch_size=2,
               num_workers=0, caption_sidecar=True, caption_features_fn=setup["enc"],
               caption_features_desc={"encoder": "tiny-t5"}, **kw)


def test_caption_shards_hold_captions_and_features_and_resume(setup):
    out = setup["base"] / "shards"
    assert _run(setup, out)["complete"]
    meta = json.load(open(out / "meta.json"))
    assert meta["captions"] == {"source": "sidecar:.txt", "features": {"dim": 16, "max_length": 6,
                                                                       "dtype": "float16", "padding": "left",
                                                                       "encoder": "tiny-t5"}}
    files = sorted(os.listdir(out / "data"))
    rows = {}
    for f in files:
        t = pq.read_table(out / "data" / f).to_pydict()
        for i, c, n, feats in zip(t["index"], t["caption"], t["caption_length"], t["caption_features"]):
            rows[i] = (c, n, np.asarray(feats, dtype=np.float32))
    assert len(rows) == 8
    texts = [rows[i][0] for i in range(8)]
    assert sorted(texts) == sorted(setup["caps"].values())  # whitespace-normalised sidecar text
    want, mask = setup["enc"](texts)
    for i in range(8):
        n = int(mask[i].sum())
        assert rows[i][1] == n and rows[i][2].shape == (n, 16)  # only the valid rows are stored
        np.testing.assert_allclose(rows[i][2], want[i, 6 - n:].half().float().numpy(), rtol=0, atol=0)
    # resume: a lost shard is rewritten identically, the others are skipped
    before = {f: (out / "data" / f).read_bytes() for f in files}
    os.remove(out / "data" / files[1])
    stats = _run(setup, out)
    assert stats["shards"] == 1 and stats["complete"]
    assert pq.read_table(out / "data" / files[1]).equals(pq.read_table(__import__("pyarrow").BufferReader(before[files[1]])))
    # another caption setting refuses to resume into the folder
    with pytest.raises(ValueError, match="captions"):
        run(tokenizer=str(setup["base"] / "tok"), data=str(setup["base"] / "img"), out=str(out), shard_size=3,
            batch_size=2, num_workers=0, caption_sidecar=True)

    # generator.data: codes + left-padded features (T = caption_tokens >= max_length) + masks
    ds = CodeShardDataset(str(out), conditioning="text", caption_tokens=8, view=0)
    items = ds.__getitems__(list(range(len(ds))))
    idx = ds._ds.with_format(None)["index"]
    for (codes, feats, m), i in zip(items, idx):
        n = int(mask[i].sum())
        assert codes.shape == (8, 8, 4) and feats.shape == (8, 16) and m.dtype == torch.bool
        assert m.tolist() == [False] * (8 - n) + [True] * n
        assert (feats[:8 - n] == 0).all()
        torch.testing.assert_close(feats[8 - n:], want[i, 6 - n:].half().float(), rtol=0, atol=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert [tuple(x.shape) for x in batch] == [(4, 8, 8, 4), (4, 8, 16), (4, 8)]

    class Cfg:  # a GPTConfig-like object with another caption width is refused
        conditioning, caption_dim, caption_tokens, groups, codebook_size, grid = "text", 32, 8, 4, 256, 8
    with pytest.raises(ValueError, match="caption_dim mismatch"):
        CodeShardDataset(str(out), config=Cfg())


def test_caption_column_of_a_datasets_source_and_errors(setup, tmp_path):
    import datasets

    imgs = [Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0], "text": ["a cat", "a dog", "cat"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["c", "d"]),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "src"))
    out = tmp_path / "shards"
    run(tokenizer=str(setup["base"] / "tok"), data=str(tmp_path / "src"), out=str(out), num_workers=0,
        caption_column="text")  # captions only, no features
    t = pq.read_table(out / "data" / sorted(os.listdir(out / "data"))[0]).to_pydict()
    assert t["caption"] == ["a cat", "a dog", "cat"] and "caption_features" not in t
    with pytest.raises(ValueError, match="no caption features"):
        CodeShardDataset(str(out), conditioning="text")
    assert len(CodeShardDataset(str(out))) == 3  # the class path reads the same shards
    with pytest.raises(ValueError, match="not a column"):
        run(tokenizer=str(setup["base"] / "tok"), data=str(tmp_path / "src"), out=str(tmp_path / "o2"),
            num_workers=0, caption_column="caption")
    with pytest.raises(ValueError, match="one of"):
        run(tokenizer=str(setup["base"] / "tok"), data=str(tmp_path / "src"), out=str(tmp_path / "o3"),
            num_workers=0, caption_column="text", caption_sidecar=True)
