"""bench/llamagen_vs_mgvq.py: the rows are what the issue says (same backbone and total codes, LlamaGen's layout vs
MGVQ's), and its --quick code path runs end to end on tiny settings and writes results.json + the plot."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from generator import GPT
from pipelines.fashion_mnist import find_fashion_mnist
from tokenizer.model import preset_config

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("llamagen_vs_mgvq", ROOT / "bench" / "llamagen_vs_mgvq.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("llamagen_vs_mgvq", mod)
    spec.loader.exec_module(mod)
    return mod


B = _bench()
ROW_NAMES = ["llamagen", "mgvq-parallel", "mgvq-ar", "mgvq-g8-ar"]


def test_rows_are_the_issues_four():
    assert list(B.ROWS) == ROW_NAMES
    lg = B.TOKENIZERS[B.ROWS["llamagen"].tokenizer]
    assert (lg.groups, lg.latent_dim, lg.codebook_size, lg.nested) == (1, 8, 1024, False)
    assert (B.ROWS["llamagen"].input_mode, B.ROWS["llamagen"].head) == ("sum", "parallel")
    assert (B.ROWS["mgvq-parallel"].input_mode, B.ROWS["mgvq-parallel"].head) == ("sum", "parallel")
    assert (B.ROWS["mgvq-ar"].input_mode, B.ROWS["mgvq-ar"].head) == ("projector", "ar")
    assert (B.ROWS["mgvq-g8-ar"].input_mode, B.ROWS["mgvq-g8-ar"].head) == ("projector", "ar")
    assert B.ROWS["mgvq-parallel"].tokenizer == B.ROWS["mgvq-ar"].tokenizer  # the same G=4 tokenizer
    assert B.TOKENIZERS[B.ROWS["mgvq-g8-ar"].tokenizer].groups == 8


@pytest.mark.parametrize("profile", ["default", "quick"])
def test_equal_codes_and_tokenizer_architecture(profile):
    """Every tokenizer: the same backbone, l2-normalised codes, beta, re-init; the same total codes (G * K)."""
    p = B.PROFILES[profile]
    cfgs = {n: preset_config("mgvq-tiny", **{**p["tok_overrides"], **t.overrides()}) for n, t in B.TOKENIZERS.items()}
    assert {c.groups * c.codebook_size for c in cfgs.values()} == {B.TOTAL_CODES}
    assert len({json.dumps(c.to_dict()["vqgan"], sort_keys=True) for c in cfgs.values()}) == 1
    assert all(c.l2_norm and c.quantizer == "vq" for c in cfgs.values())
    assert len({(c.beta, c.dead_code_reinit, c.usage_window) for c in cfgs.values()}) == 1
    assert cfgs["g4-c32"].to_dict() == preset_config("mgvq-tiny", **p["tok_overrides"]).to_dict()  # the demo's
    assert cfgs["g1-c8"].nested_keep_probs is None and cfgs["g8-c32"].nested_keep_probs is not None


@pytest.mark.parametrize("profile", ["default", "quick"])
def test_equal_gpt_backbone(profile):
    """The same backbone (dim, layers, heads) in every row; only the input and the head differ, and the backbone's
    own parameters (attention + FFN blocks) are identical in count."""
    p = B.PROFILES[profile]
    blocks = {}
    for name, row in B.ROWS.items():
        args = B.gen_args(row, p["gen_args"])
        assert {k: args[k] for k in ("dim", "n_layer", "n_head")} == {k: p["gen_args"][k] for k in
                                                                      ("dim", "n_layer", "n_head")}
        t = B.TOKENIZERS[row.tokenizer]
        with torch.device("meta"):
            kw = {"codebook": torch.empty(t.groups, t.codebook_size, t.latent_dim // t.groups)} \
                if row.input_mode == "projector" else {}
            m = GPT.from_preset("GPT-tiny", groups=t.groups, codebook_size=t.codebook_size, grid=8, num_classes=10,
                                **args, **kw)
        assert (m.config.input_mode, m.config.head) == (row.input_mode, row.head)
        blocks[name] = sum(q.numel() for q in m.layers.parameters())
    assert len(set(blocks.values())) == 1, blocks


def test_strip_flags():
    assert B.strip_flags(["--quick", "--seeds", "0", "1", "--out", "x", "--jobs", "2"], ("--jobs", "--seeds")) == \
        ["--quick", "--out", "x"]


def test_bad_settings_are_refused(tmp_path):
    for argv, msg in ((["--per-class", "0"], "--per-class"), (["--guidance", "1", "1"], "--guidance"),
                      (["--top-k", "-1"], "--top-k")):
        with pytest.raises(SystemExit, match=msg):
            B.main(["--quick", "--out", str(tmp_path), *argv])


try:
    DATA = find_fashion_mnist(None, download=False)
except FileNotFoundError:  # pragma: no cover - CI installs the Debian package
    DATA = None


@pytest.mark.slow
@pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_quick_path_end_to_end(tmp_path):
    out = tmp_path / "lvm"
    argv = ["--quick", "--out", str(out), "--data-dir", str(DATA), "--seeds", "0", "--guidance", "1", "3",
            "--per-class", "2", "--tok-steps", "2", "--gen-steps", "2", "--cache-limit", "64", "--num-train", "300",
            "--threads", "1"]
    assert B.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(ROW_NAMES) <= set(res)
    for r in ROW_NAMES:
        row = res[r]
        assert [e["guidance_scale"] for e in row["sweep"]] == [1.0, 3.0]
        for e in row["sweep"]:
            for k in ("fd", "accuracy", "precision", "recall", "images_per_s", "classifier_score"):
                assert isinstance(e[k], float) and math.isfinite(e[k]), (r, k, e[k])
            assert e["fd"] >= 0 and 0 <= e["accuracy"] <= 1 and 0 <= e["precision"] <= 1 and 0 <= e["recall"] <= 1
            assert e["images_per_s"] > 0 and 1.0 <= e["classifier_score"] <= 10.0
            assert list(e["per_seed"]) == ["0"]
        assert row["total_codes"] == 1024 and row["params"] > 0 and row["train_seconds"] > 0
        assert 3.0 < row["tokenizer_psnr"] < 60.0 and row["tokenizer_recon_fd"] >= 0
    # the parallel rows share nothing but the layout: G=1 has one head of 1024 codes, G=4 four heads of 256
    assert (res["llamagen"]["groups"], res["llamagen"]["codebook_size"]) == (1, 1024)
    assert res["mgvq-ar"]["tokenizer_psnr"] == res["mgvq-parallel"]["tokenizer_psnr"]  # one G=4 tokenizer
    # the evaluation went through `mgvq compare` with the classifier as the feature net
    cmp = json.loads((out / "seed0" / "eval" / "cfg3" / "compare.json").read_text())
    assert set(cmp["results"]) == set(ROW_NAMES) and cmp["settings"]["guidance_scale"] == 3.0
    m = json.loads((out / "seed0" / "eval" / "cfg3" / "llamagen" / "metrics.json").read_text())
    assert m["feature_net"].startswith("classifier:") and m["num_images"] == 20
    assert m["fd"] == pytest.approx(res["llamagen"]["sweep"][1]["fd"])
    real = res["meta"]["real_images"]  # real training images through the same evaluator: the ceiling
    assert real["num_images"] == 20 and real["accuracy"] > 0.1 and real["fd"] >= 0 and 0 < real["recall"] <= 1
    png = out / "fd_vs_accuracy.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert "| llamagen |" in (out / "results.md").read_text()
    # a rerun reuses every stage and reproduces the numbers
    assert B.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["mgvq-g8-ar"]["sweep"] == res["mgvq-g8-ar"]["sweep"]
    # the report alone, from the seeds' results: same numbers, the original command kept
    (out / "fd_vs_accuracy.png").unlink()
    assert B.main(argv + ["--report-only"]) == 0
    rep = json.loads((out / "results.json").read_text())
    assert rep["llamagen"]["sweep"] == res["llamagen"]["sweep"] and (out / "fd_vs_accuracy.png").is_file()
    assert "--report-only" not in rep["meta"]["command"]
    with pytest.raises(SystemExit, match="no seed_results.json for seed"):
        B.main(argv + ["--report-only", "--seeds", "7"])
    # longer generators on the same tokenizers in a new folder; a tokenizer with other settings is refused, untouched
    longer = tmp_path / "longer"
    argv2 = [a if a != str(out) else str(longer) for a in argv]
    argv2[argv2.index("--gen-steps") + 1] = "3"
    assert B.main(argv2 + ["--rows", "llamagen", "--tokenizers-from", str(out)]) == 0
    res2 = json.loads((longer / "results.json").read_text())
    assert res2["llamagen"]["tokenizer_psnr"] == res["llamagen"]["tokenizer_psnr"]
    assert not (longer / "seed0" / "g1-c8").exists() and set(res2) == {"llamagen", "meta"}
    argv3 = [a if a != str(out) else str(tmp_path / "other") for a in argv]
    argv3[argv3.index("--tok-steps") + 1] = "3"
    with pytest.raises(FileNotFoundError, match="no finished stage with these settings"):
        B.main(argv3 + ["--rows", "llamagen", "--tokenizers-from", str(out)])
    assert (out / "seed0" / "g1-c8" / "tokenizer" / "final" / "model.safetensors").is_file()
