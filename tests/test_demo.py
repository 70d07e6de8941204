"""`mgvq demo --quick` end to end into a temp folder: every output exists and is sane; the pipeline reloads and samples."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.fashion_mnist import find_fashion_mnist

try:
    DATA = find_fashion_mnist(None, download=False)
except FileNotFoundError:  # pragma: no cover - the CI image has the Debian package
    DATA = None

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    from pipelines.cli import main as cli_main

    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli_main(["demo", "--quick", "--out", str(out), "--data-dir", str(DATA), "--seed", "0"]) == 0
    return out


def _png(path: Path) -> Image.Image:
    assert path.is_file(), f"{path} missing"
    img = Image.open(path)
    img.load()
    return img


def test_outputs_exist(demo_out):
    for name in ("metrics.json", "README.md", "samples_grid.png", "reconstructions.png", "loss_curves.png",
                 "pipeline/pipeline_config.json", "pipeline/tokenizer/model.safetensors",
                 "pipeline/generator/model.safetensors", "classifier/model.safetensors", "codes/meta.json",
                 "tokenizer/final/config.json", "generator/final/config.json", "tokenizer/metrics.jsonl",
                 "generator/metrics.jsonl"):
        assert (demo_out / name).exists(), f"{name} missing from the demo output"


def test_metrics_keys_and_values(demo_out):
    m = json.loads((demo_out / "metrics.json").read_text())
    assert m["profile"] == "quick"
    assert m["class_names"] == NAMES
    assert 0.0 <= m["classifier"]["test_accuracy"] <= 1.0
    assert m["classifier"]["test_accuracy"] > 0.15  # well above chance (0.1) even after a few steps
    t = m["tokenizer"]
    assert (t["groups"], t["codebook_size"], t["latent_dim"], t["downsample"]) == (4, 256, 32, 4)
    assert 5.0 < t["psnr"] < 60.0 and 5.0 < t["psnr_of_mean_mse"] < 60.0
    assert -1.0 <= t["ssim"] <= 1.0
    assert len(t["codebook_usage"]) == 4 and all(0.0 < u <= 1.0 for u in t["codebook_usage"])
    assert len(t["codebook_perplexity"]) == 4 and all(1.0 <= p <= 256.0 for p in t["codebook_perplexity"])
    assert sorted(t["psnr_by_groups_to_use"]) == ["1", "2", "3", "4"]
    assert t["psnr_by_groups_to_use"]["4"] == pytest.approx(t["psnr"])
    g = m["generation"]
    assert g["num_samples"] == 10 * g["per_class"]
    for tag in ("cfg", "no_cfg"):
        assert 0.0 <= g[f"cond_accuracy_{tag}"] <= 1.0
        assert sorted(g[f"per_class_accuracy_{tag}"]) == sorted(NAMES)
        assert math.isfinite(g[f"classifier_fd_{tag}"]) and g[f"classifier_fd_{tag}"] >= 0.0
    assert g["classifier_fd_real_vs_real"] >= 0.0 and g["classifier_fd_recon_vs_real"] >= 0.0
    assert m["generator"]["config"]["head"] == "parallel" and m["generator"]["config"]["groups"] == 4
    assert math.isfinite(m["generator"]["final_loss"])
    assert m["data"]["num_cached_codes"] > 0
    for k in ("data", "classifier", "tokenizer", "cache_codes", "generator", "sampling", "total"):
        assert m["timings_s"][k] >= 0.0
    readme = (demo_out / "README.md").read_text()
    assert "Ankle boot" in readme and "conditional accuracy" in readme


def test_png_sizes(demo_out):
    m = json.loads((demo_out / "metrics.json").read_text())
    cols, pad, scale = 3, 2, 2  # quick profile: 3 samples per class, 2 px padding, shown at 2x
    grid = _png(demo_out / "samples_grid.png")
    # one row per class, its name in a left margin
    assert grid.size[1] == scale * (10 * 34 + pad) and grid.size[0] > scale * (cols * 34 + pad)
    assert list(grid.size) == m["outputs"]["samples_grid_size"]
    arr = np.asarray(grid.convert("RGB"))
    assert arr.std() > 1.0  # not a blank image
    rec = _png(demo_out / "reconstructions.png")
    # originals + the first 1..4 groups, 8 columns, each row labelled
    assert rec.size[1] == scale * (5 * 34 + pad) and rec.size[0] > scale * (8 * 34 + pad)
    margin = np.asarray(rec.convert("L"))[:, :rec.size[0] - scale * (8 * 34 + pad)]
    assert (margin < 100).any()  # the row labels were drawn
    curves = _png(demo_out / "loss_curves.png")
    assert curves.size[0] > 800 and curves.size[1] > 200


def test_pipeline_reloads_and_samples(demo_out):
    from pipelines import MGVQPipeline

    pipe = MGVQPipeline.from_pretrained(str(demo_out / "pipeline"))
    assert pipe.id2label == dict(enumerate(NAMES))
    assert pipe.image_size == 32 and pipe.defaults.guidance_scale == 3.0
    measured = json.loads((demo_out / "metrics.json").read_text())
    assert pipe.metrics["cond_accuracy_cfg"] == measured["generation"]["cond_accuracy_cfg"]  # the card's numbers
    assert "cond_accuracy_cfg" in (demo_out / "pipeline" / "README.md").read_text()
    out = pipe(["Sneaker", 8], generator=torch.Generator().manual_seed(0), output_type="pt", progress=False)
    assert out.images.shape == (2, 3, 32, 32)
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
    again = pipe(["Sneaker", 8], generator=torch.Generator().manual_seed(0), output_type="pt", progress=False)
    assert torch.equal(out.images, again.images)


def test_rerun_reuses_finished_stages(demo_out, capsys):
    from pipelines.demo import main

    before = (demo_out / "tokenizer" / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(["--quick", "--out", str(demo_out), "--data-dir", str(DATA)]) == 0
    log = capsys.readouterr().out
    assert "tokenizer: reusing" in log and "codes: reusing" in log and "generator: reusing" in log
    assert (demo_out / "tokenizer" / "final" / "model.safetensors").stat().st_mtime_ns == before
    m = json.loads((demo_out / "metrics.json").read_text())
    assert m["classifier"]["cached"] is True


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from pipelines.demo import main

    with pytest.raises(SystemExit, match=r"(?s)not found in .*apt-get install dataset-fashion-mnist"):
        main(["--quick", "--out", str(tmp_path / "x"), "--data-dir", str(tmp_path / "no-such-dir")])
