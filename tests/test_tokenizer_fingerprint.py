"""The tokenizer that made the codes is the one the pipeline decodes with: cache-codes records its sha256 in meta.json,
generator.train carries it into train_summary.json, `mgvq convert --from pipeline` and MGVQPipeline.from_pretrained
refuse any other tokenizer with a message naming both sha256s."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import MGVQPipeline
from pipelines.convert import main as convert
from runtime.fingerprint import tokenizer_sha256
from tokenizer import MGVQTokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tokenizer A -> codes of 8 images -> a 2-step GPT on them; tokenizer B is another init of the same preset."""
    base = tmp_path_factory.mktemp("fp")
    for name, seed in (("tokA", 0), ("tokB", 1)):
        torch.manual_seed(seed)
        MGVQTokenizer.from_preset("mgvq-tiny").eval().save_pretrained(str(base / name))
    rng = np.random.default_rng(0)
    for c in ("bag", "shoe"):
        (base / "images" / c).mkdir(parents=True)
        for j in range(4):
            small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(small).resize((32, 32), Image.BICUBIC).save(base / "images" / c / f"{j}.png")
    from tokenizer.cache_codes import main as cache_codes

    assert cache_codes(["--tokenizer", str(base / "tokA"), "--data", str(base / "images"), "--out",
                        str(base / "codes"), "--num-workers", "0", "--batch-size", "8"]) == 0
    from generator.train import load_config, train

    cfg = load_config("configs/generator/tiny.yaml", [f"data={base / 'codes'}", f"out_dir={base / 'gen'}", "steps=2",
                                                      "global_batch_size=4", "batch_size=4", "num_workers=0",
                                                      "sample_every=0", "log_every=1", "precision=fp32"])
    train(cfg)
    return base


def _sha(d) -> str:
    return tokenizer_sha256(str(d))


def test_training_records_the_codes_tokenizer(trained):
    meta = json.loads((trained / "codes" / "meta.json").read_text())
    summary = json.loads((trained / "gen" / "final" / "train_summary.json").read_text())
    assert summary["tokenizer_sha256"] == meta["tokenizer"]["weights_sha256"] == _sha(trained / "tokA")
    assert _sha(trained / "tokA") != _sha(trained / "tokB")


def test_convert_pipeline_refuses_another_tokenizer(trained, tmp_path):
    gen = str(trained / "gen" / "final")
    a, b = _sha(trained / "tokA"), _sha(trained / "tokB")
    with pytest.raises(ValueError, match=rf"tokenizer .*tokB \(sha256 {b}\) is not the tokenizer that made the "
                                         rf"codes: .*train_summary.json .*records sha256 {a}"):
        convert(["--from", "pipeline", str(trained / "tokB"), gen, str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "pipeline_config.json").exists()
    # the shards' meta.json directly (--codes), for a generator folder that records nothing
    bare = tmp_path / "bare_gen"
    shutil.copytree(gen, bare)
    (bare / "train_summary.json").unlink()
    with pytest.raises(ValueError, match=rf"sha256 {b}.*meta.json \(tokenizer.weights_sha256\) records sha256 {a}"):
        convert(["--from", "pipeline", str(trained / "tokB"), str(bare), str(tmp_path / "bad2"), "--codes",
                 str(trained / "codes")])
    assert convert(["--from", "pipeline", str(trained / "tokB"), str(bare), str(tmp_path / "unchecked")]) == 0
    assert "tokenizer_sha256" not in json.loads((tmp_path / "unchecked" / "pipeline_config.json").read_text())
    # the right tokenizer assembles, and the pipeline folder carries the record on
    assert convert(["--from", "pipeline", str(trained / "tokA"), gen, str(tmp_path / "ok")]) == 0
    cfg = json.loads((tmp_path / "ok" / "pipeline_config.json").read_text())
    assert cfg["tokenizer_sha256"] == a
    pipe = MGVQPipeline.from_pretrained(str(tmp_path / "ok"))
    assert pipe.tokenizer_sha256 == a
    assert pipe([0], progress=False, generator=torch.Generator().manual_seed(0)).codes.shape == (1, 8, 8, 4)
    # re-assembling from a pipeline's generator/ folder finds the record one level up
    with pytest.raises(ValueError, match=rf"pipeline_config.json \(tokenizer_sha256.*records sha256 {a}"):
        convert(["--from", "pipeline", str(trained / "tokB"), str(tmp_path / "ok" / "generator"), str(tmp_path / "x")])


def test_from_pretrained_refuses_a_swapped_tokenizer(trained, tmp_path):
    assert convert(["--from", "pipeline", str(trained / "tokA"), str(trained / "gen" / "final"),
                    str(tmp_path / "p")]) == 0
    pipe = MGVQPipeline.from_pretrained(str(tmp_path / "p"))
    pipe.save_pretrained(str(tmp_path / "p2"))  # a save/load round trip keeps the bytes and the record
    assert MGVQPipeline.from_pretrained(str(tmp_path / "p2")).tokenizer_sha256 == _sha(trained / "tokA")
    shutil.copy(trained / "tokB" / "model.safetensors", tmp_path / "p" / "tokenizer" / "model.safetensors")
    a, b = _sha(trained / "tokA"), _sha(trained / "tokB")
    with pytest.raises(ValueError, match=rf"sha256 {b}\) is not the tokenizer that made the codes: .*"
                                         rf"pipeline_config.json .*records sha256 {a}"):
        MGVQPipeline.from_pretrained(str(tmp_path / "p"))
    # a tokenizer changed in memory (e.g. fine-tuned) is refused when the pipeline is saved
    with torch.no_grad():
        next(pipe.tokenizer.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="is not the tokenizer that made the codes"):
        pipe.save_pretrained(str(tmp_path / "p3"))
