"""`mgvq demo --text --quick` end to end: caption shards, text GPT, pipeline with its T5, prompt-labelled grid,
caption-class accuracy with and without CFG; a rerun reuses every stage."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.fashion_mnist import find_fashion_mnist

try:
    DATA = find_fashion_mnist(None, download=False)
except FileNotFoundError:  # pragma: no cover
    DATA = None

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def test_text_demo_quick(tmp_path, capsys):
    from pipelines.cli import main as cli_main
    from pipelines.demo_text import SYNONYMS, TEMPLATES, caption

    out = tmp_path / "run"
    assert cli_main(["demo", "--text", "--quick", "--out", str(out), "--data-dir", str(DATA)]) == 0
    m = json.loads((out / "metrics_text.json").read_text())
    g = m["generation"]
    assert g["num_samples"] == 30 and len(g["grid_prompts"]) == 10
    for tag in ("cfg", "no_cfg"):
        assert 0.0 <= g[f"caption_class_accuracy_{tag}"] <= 1.0
        assert len(g[f"per_class_accuracy_{tag}"]) == 10
    assert m["text_encoder"]["random"] and m["text_encoder"]["max_length"] == 32
    assert (out / "samples_text_grid.png").is_file() and "caption's class" in (out / "README_text.md").read_text()
    # the shards hold the demo's captions, the T5 features and the class labels
    import pyarrow.parquet as pq
    meta = json.loads((out / "codes_text" / "meta.json").read_text())
    assert meta["captions"]["source"] == "function:pipelines.demo_text.caption"
    t = pq.read_table(out / "codes_text" / meta["shards"][0], columns=["caption", "label", "index", "caption_length"])
    rows = t.to_pydict()
    assert all(c == caption(i, y) for c, y, i in zip(rows["caption"], rows["label"], rows["index"]))
    assert all(SYNONYMS[y][i % 3] in c for c, y, i in zip(rows["caption"], rows["label"], rows["index"]))
    assert min(rows["caption_length"]) >= 2 and max(rows["caption_length"]) == 30
    assert len(TEMPLATES) * 30 == len({t.format(s) for syn in SYNONYMS for s in syn for t in TEMPLATES})
    # the saved pipeline samples from prompts after a reload
    from pipelines import MGVQPipeline
    pipe = MGVQPipeline.from_pretrained(str(out / "pipeline_text"))
    assert pipe(prompt=["a photo of a bag"], output_type="pt", progress=False).images.shape == (1, 3, 32, 32)
    # a rerun reuses every stage
    capsys.readouterr()
    assert cli_main(["demo", "--text", "--quick", "--out", str(out), "--data-dir", str(DATA)]) == 0
    log = capsys.readouterr().out
    for stage in ("tokenizer: reusing", "text encoder: reusing", "caption codes: reusing", "text generator: reusing"):
        assert stage in log
