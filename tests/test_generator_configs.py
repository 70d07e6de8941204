"""The ImageNet generator configs (configs/generator/gpt-{b,l,xl,xxl}-{mgvq,parallel}.yaml) load with the layout and
recipe they promise, and each trains for two steps through `python -m generator.train --config <yaml>` with tiny
overrides (synthetic codes; the `mgvq` layout reads its frozen codebook from a tiny tokenizer folder)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from generator import GPT
from generator.train import load_config, main
from tokenizer import MGVQTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"b": ("GPT-B", 256, 1e-4), "l": ("GPT-L", 256, 1e-4), "xl": ("GPT-XL", 256, 2e-4),
         "xxl": ("GPT-XXL", 512, 2e-4)}
CONFIGS = [(s, layout) for s in SIZES for layout in ("mgvq", "parallel")]


def _path(size, layout):
    return os.path.join(ROOT, "configs", "generator", f"gpt-{size}-{layout}.yaml")


@pytest.mark.parametrize("size,layout", CONFIGS)
def test_config_loads_with_the_layout_and_recipe(size, layout):
    cfg = load_config(_path(size, layout))
    preset, batch, lr = SIZES[size]
    assert (cfg.model, cfg.global_batch_size, cfg.lr, cfg.epochs) == (preset, batch, lr, 300)
    assert (tuple(cfg.betas), cfg.weight_decay, cfg.grad_clip, cfg.lr_schedule) == ((0.9, 0.95), 0.05, 1.0, "constant")
    want = {"mgvq": {"input_mode": "projector", "head": "ar"}, "parallel": {"input_mode": "sum", "head": "parallel"}}
    assert {k: cfg.model_overrides[k] for k in ("input_mode", "head")} == want[layout]
    assert (cfg.codebook is not None) == (layout == "mgvq")
    assert cfg.sample_top_k == 4096  # MGVQ's --top-k 12 (log2)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    MGVQTokenizer.from_preset("mgvq-tiny").eval().save_pretrained(str(d))  # G=4, K=256, C=32
    return d


@pytest.mark.parametrize("size,layout", CONFIGS)
def test_config_smoke_trains_two_steps(size, layout, tok_dir, tmp_path):
    out = tmp_path / "run"
    tiny = ["data=synthetic", "synthetic_meta={groups: 4, codebook_size: 256, grid: 4, num_classes: 10}",
            "synthetic_size=16", "model_overrides.dim=64", "model_overrides.n_layer=1", "model_overrides.n_head=4",
            "global_batch_size=4", "batch_size=4", "steps=2", "num_workers=0", "precision=fp32",
            "sample_every=0", "sample_top_k=16", "save_every=2", "log_with=none", f"out_dir={out}"]
    if layout == "mgvq":
        tiny.append(f"codebook={tok_dir}")
    assert main(["--config", _path(size, layout), *tiny]) == 0
    gpt = GPT.from_pretrained(str(out / "final"))
    c = gpt.config
    assert (c.dim, c.n_layer, c.groups, c.codebook_size, c.grid, c.num_classes) == (64, 1, 4, 256, 4, 10)
    if layout == "mgvq":
        assert (c.input_mode, c.head, c.ar_head_layers) == ("projector", "ar", 2)
        raw = load_file(str(tok_dir / "model.safetensors"))["quantize.embedding.weight"]
        torch.testing.assert_close(gpt.codebook, raw.reshape(-1, raw.shape[-1]), rtol=0, atol=0)
    else:
        assert (c.input_mode, c.head) == ("sum", "parallel")
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["step"] == 2 and summary["skipped_steps"] == 0
