"""bench/tokenizer_groups.py end to end at toy size: every kind of row trains through tokenizer.train and is evaluated."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ablation_bench_runs_every_kind_of_row(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_groups", ROOT / "bench" / "tokenizer_groups.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = ["single", "g4-nested", "g8-nested+ft", "g8+nested-ft", "g8-avg", "ae", "kl"]
    assert bench.main(["--seeds", "0", "--rows", *rows, "--steps", "4", "--batch-size", "4", "--num-crops", "64",
                       "--eval-crops", "8", "--widths", "8", "8", "32", "--image-size", "16",
                       "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"]["0"]
    assert list(res) == rows
    assert len(res["g4-nested"]["psnr_by_groups"]) == 4 and len(res["g8-nested+ft"]["usage"]) == 8
    assert res["g4-nested"]["psnr_by_groups"][-1] == res["g4-nested"]["psnr"]
    assert res["ae"]["usage"] is None and res["kl"]["psnr_by_groups"] == []
    assert all(5 < r["psnr"] < 60 for r in res.values())
    # the two-stage row trained 3 + 1 steps: its stage-2 model has masking off, stage 1 had it on
    s1 = json.loads((tmp_path / "seed0" / "g8-nested+ft.stage1" / "final" / "config.json").read_text())
    s2 = json.loads((tmp_path / "seed0" / "g8-nested+ft" / "final" / "config.json").read_text())
    assert s1["nested_keep_probs"] is not None and s2["nested_keep_probs"] is None
    r1 = json.loads((tmp_path / "seed0" / "g8+nested-ft.stage1" / "final" / "config.json").read_text())
    r2 = json.loads((tmp_path / "seed0" / "g8+nested-ft" / "final" / "config.json").read_text())
    assert r1["nested_keep_probs"] is None and r2["nested_keep_probs"] == pytest.approx([0.2] + [0.2 / 6] * 6 + [0.6])
    out = capsys.readouterr().out
    assert "g8-nested+ft" in out and "wall time" in out


def test_ablation_bench_runs_seeds_one_at_a_time(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_groups", ROOT / "bench" / "tokenizer_groups.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--seeds", "0", "1", "--jobs", "1", "--rows", "g8-nested-sample", "--steps", "2",
                       "--batch-size", "4", "--num-crops", "16", "--eval-crops", "8", "--widths", "8", "8", "32",
                       "--image-size", "16", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(res) == ["0", "1"] and res["0"]["g8-nested-sample"]["psnr"] != res["1"]["g8-nested-sample"]["psnr"]
    cfg = json.loads((tmp_path / "seed1" / "g8-nested-sample" / "final" / "config.json").read_text())
    assert cfg["nested_mask_per"] == "sample"
    assert "2 process(es), 1 at a time" in capsys.readouterr().out
    # the table of earlier runs, merged per seed, without training anything
    run = json.loads((tmp_path / "results.json").read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**run, "results": {s: {"single": r["g8-nested-sample"]} for s, r in run["results"].items()}}))
    assert bench.main(["--from-results", str(tmp_path / "results.json"), str(other),
                       "--rows", "single", "g8-nested-sample"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 steps, batch 4") and "single" in out and "g8-nested-sample" in out
    other.write_text(json.dumps({**run, "args": {**run["args"], "steps": 3}}))
    with pytest.raises(SystemExit):
        bench.main(["--from-results", str(tmp_path / "results.json"), str(other)])
    err = capsys.readouterr().err
    assert "other settings" in err and "['steps']" in err


def test_group_use_finds_a_group_the_decoder_ignores():
    import torch

    spec = importlib.util.spec_from_file_location("group_use", ROOT / "bench" / "tokenizer_group_use.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from tokenizer import MGVQTokenizer

    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", image_size=16).eval()
    D = tok.config.latent_dim // tok.config.groups
    with torch.no_grad():
        tok.post_quant_conv.weight[:, D:2 * D] = 0  # the decoder never sees group 2
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    r = bench.group_use(tok, x, batch=8)
    drops = [g["psnr_drop"] for g in r["groups"]]
    assert drops[1] == 0.0 and all(d != 0.0 for i, d in enumerate(drops) if i != 1)
    assert all(0 < g["entropy_bits"] <= r["max_bits"] + 1e-6 for g in r["groups"]) and r["max_bits"] == 8
    assert 0 < r["psnr"] < 60


def _bench():
    spec = importlib.util.spec_from_file_location("bench_groups", ROOT / "bench" / "tokenizer_groups.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_sdvae_row_needs_four_width_levels(capsys):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0", "--rows", "sdvae-f8c4", "--widths", "8", "8", "32", "--image-size", "16"])
    assert "row sdvae-f8c4 needs f8: --widths must have at least 4 levels" in capsys.readouterr().err
    assert bench.row_widths("sdvae-f8c4", bench.rows(1024)["sdvae-f8c4"], [16, 32, 64, 64, 64]) == [16, 32, 64, 64]
    assert "sdvae-f8c4" in bench.DEFAULT_ROWS
