"""generator.train on caption shards: a text-conditional GPT (model_overrides.conditioning=text) learns from
T5 caption features + masks; caption width / length come from the shards' meta.json; export + samples."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from _t5 import make_tiny_t5
from generator import GPT
from generator.train import load_config, train
from pipelines.text_encoder import T5TextEncoder
from tokenizer import MGVQTokenizer
from tokenizer.cache_codes import run as cache_codes

CAPS = [["a dark square", "black"], ["a bright white square", "white picture"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("t2itrain")
    torch.manual_seed(0)
    MGVQTokenizer.from_preset("mgvq-tiny").eval().save_pretrained(str(base / "tok"))
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "bright"]):
        (base / "img" / name).mkdir(parents=True)
        for j in range(24):
            v = rng.integers(0, 8, (16, 16, 3)) + (200 if c else 20)
            Image.fromarray(v.astype(np.uint8)).save(base / "img" / name / f"{j}.png")
    enc = T5TextEncoder.from_pretrained(make_tiny_t5(base / "t5", [t for v in CAPS for t in v]), max_length=6,
                                        device="cpu")
    cache_codes(tokenizer=str(base / "tok"), data=str(base / "img"), out=str(base / "shards"), num_workers=0,
                caption_fn=lambda i, label: CAPS[label][i % 2], caption_desc="two captions per class",
                caption_features_fn=enc)
    return base


def test_train_text_conditional_gpt_on_caption_shards(shards, tmp_path):
    out = tmp_path / "gen"
    cfg = load_config("configs/generator/tiny.yaml", [
        f"data={shards / 'shards'}", f"out_dir={out}", "model_overrides.conditioning=text", "steps=150",
        "sample_every=0", "save_every=150", "log_every=5", "global_batch_size=16", "batch_size=16",
        "model_overrides.token_dropout_p=0", "model_overrides.resid_dropout_p=0", "model_overrides.ffn_dropout_p=0",
        "sample_classes=[0,30]"])
    summary = train(cfg)
    m = GPT.from_pretrained(str(out / "final"))
    assert (m.config.conditioning, m.config.caption_dim, m.config.caption_tokens) == ("text", 16, 6)
    losses = [json.loads(ln)["loss"] for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
    assert losses[-1] < losses[0] - 0.5, losses
    assert abs(summary["export_eval_loss"] - summary["final_eval_loss"]) < 1e-4
    assert os.path.isfile(out / "samples" / "00000150.png") or any(
        f.endswith(".png") for f in os.listdir(out / "samples"))
    # the captions matter: the right caption predicts the first position (nothing else tells the class there) better
    # than the other class's caption
    from generator.data import CodeShardDataset
    ds = CodeShardDataset(str(shards / "shards"), config=m.config, view=0)
    items = ds.__getitems__(list(range(len(ds))))
    codes = torch.stack([c for c, _, _ in items])
    feats, mask = torch.stack([f for _, f, _ in items]), torch.stack([k for _, _, k in items])
    swap = torch.cat([torch.arange(24, 48), torch.arange(24)])  # folder order: 24 dark, then 24 bright
    def first_position_loss(f, k):
        with torch.no_grad():
            lg = m.eval()(codes, f, cond_mask=k)[:, 0]  # (B, G, K)
        return torch.nn.functional.cross_entropy(lg.flatten(0, 1), codes.flatten(1, 2)[:, 0].flatten())

    right, wrong = first_position_loss(feats, mask), first_position_loss(feats[swap], mask[swap])
    assert right < wrong - 0.5, (float(right), float(wrong))
