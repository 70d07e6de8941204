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


# ---- issue 21: zero-shot photos, the other domain, the SD-VAE-shaped row, the quantization error -------------------
def _bench():
    spec = importlib.util.spec_from_file_location("bench_groups", ROOT / "bench" / "tokenizer_groups.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_zero_shot_photos_are_not_training_photos(tmp_path):
    import numpy as np
    from PIL import Image
    from skimage import data

    from tokenizer.data import SKIMAGE_PHOTOS

    bench = _bench()
    photos = bench.zero_shot_photos()
    assert sorted(photos) == sorted(bench.ZERO_SHOT_PHOTOS) and not set(photos) & set(SKIMAGE_PHOTOS)
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 256
               for p in photos.values())
    # what the check catches: a training name, a training photo under another name (skimage's cat IS chelsea), the
    # other view of the training stereo pair, a mirrored training photo
    with pytest.raises(ValueError, match=r"\['astronaut'\] are training photos"):
        bench.check_not_training({"astronaut": data.astronaut()})
    with pytest.raises(ValueError, match="near-duplicate of the training photo 'chelsea'"):
        bench.check_not_training({"kitten": data.chelsea()})
    with pytest.raises(ValueError, match="'stereo_motorcycle'"):
        bench.check_not_training({"right_view": data.stereo_motorcycle()[1]})
    with pytest.raises(ValueError, match="'coffee'"):
        bench.check_not_training({"mirror": np.ascontiguousarray(data.coffee()[:, ::-1])})
    # a folder source gets the same check
    Image.fromarray(data.rocket()).save(tmp_path / "launch.png")
    with pytest.raises(ValueError, match="'rocket'"):
        bench.zero_shot_photos(str(tmp_path))
    (tmp_path / "launch.png").unlink()
    Image.fromarray(photos["retina"]).save(tmp_path / "eye.png")
    assert list(bench.zero_shot_photos(str(tmp_path))) == ["eye"]
    (tmp_path / "eye.png").unlink()
    with pytest.raises(FileNotFoundError, match="no images"):
        bench.zero_shot_photos(str(tmp_path))


def test_zero_shot_sizes_and_square_crop():
    import numpy as np

    bench = _bench()
    assert bench.zero_shot_sizes(32) == [32, 64, 128, 256] and bench.zero_shot_sizes(16) == [16, 32, 64, 128]
    photo = np.zeros((20, 40, 3), np.uint8)
    photo[:, 10:30] = 200  # the centre square; the sides are cut off
    assert (bench.square(photo, 20) == 200).all()
    assert (bench.square(photo.transpose(1, 0, 2), 20) == 200).all()
    x = np.arange(2 * 8 * 8 * 3).astype(np.uint8).reshape(2, 8, 8, 3)
    t = bench.tiles(x, 4)  # row-major tiles of each image in turn
    assert t.shape == (8, 4, 4, 3) and (t[1] == x[0, :4, 4:]).all() and (t[6] == x[1, 4:, :4]).all()
    sets = bench.zero_shot_images({"a": photo, "b": photo[:, ::-1]}, [8, 16])
    assert {s: x.shape for s, x in sets.items()} == {8: (2, 8, 8, 3), 16: (2, 16, 16, 3)}


def test_quant_error_is_the_quantizers_own_distance():
    import numpy as np
    import torch

    from tokenizer import MGVQTokenizer

    bench = _bench()
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", image_size=16).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    err = bench.quant_error(tok, images, batch=4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = tok.quantize(tok.encode_latent(x))  # vq loss = mean over positions and the D dims of (q - z)^2
    D = tok.config.latent_dim // tok.config.groups
    assert len(err) == tok.config.groups and 0 < min(err) and max(err) <= 4
    assert err == pytest.approx((out.vq_loss * D).tolist(), rel=1e-4)


def test_sdvae_row_needs_four_width_levels(capsys):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0", "--rows", "sdvae-f8c4", "--widths", "8", "8", "32", "--image-size", "16"])
    assert "row sdvae-f8c4 needs f8: --widths must have at least 4 levels" in capsys.readouterr().err
    assert bench.row_widths("sdvae-f8c4", bench.rows(1024)["sdvae-f8c4"], [16, 32, 64, 64, 64]) == [16, 32, 64, 64]
    assert "sdvae-f8c4" in bench.DEFAULT_ROWS


def test_zero_shot_other_domain_and_quant_error_in_results(tmp_path, capsys):
    import math

    from pipelines.fashion_mnist import DEBIAN_DIR
    from tokenizer.model import TokenizerConfig

    bench = _bench()
    rows = ["single", "g4", "ae", "sdvae-f8c4"]
    assert bench.main(["--seeds", "0", "--rows", *rows, "--steps", "2", "--batch-size", "4", "--num-crops", "16",
                       "--eval-crops", "8", "--widths", "8", "8", "8", "32", "32", "--image-size", "16",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    res = run["results"]["0"]
    assert run["zero_shot"]["sizes"] == [16, 32, 64, 128]
    assert list(run["zero_shot"]["sets"]) == ["imagenet20", "skimage9"]  # foolbox comes with the dev extra
    assert run["zero_shot"]["sets"]["skimage9"] == sorted(bench.ZERO_SHOT_PHOTOS)
    assert len(run["zero_shot"]["sets"]["imagenet20"]) == 20
    fmnist = Path(DEBIAN_DIR).is_dir()
    for name in rows:
        r = res[name]
        assert list(r["zero_shot"]) == ["16", "32", "64", "128"] and r["zero_shot_set"] == "imagenet20"
        assert r["zero_shot"] == r["zero_shot_sets"]["imagenet20"] != r["zero_shot_sets"]["skimage9"]
        assert all(math.isfinite(v) and 3 < v < 60 for zs in r["zero_shot_sets"].values() for v in zs.values())
        tiled = r["zero_shot_tiled_sets"]["skimage9"]  # at 1x one tile is the image; larger sizes differ
        assert tiled["16"] == r["zero_shot_sets"]["skimage9"]["16"] and tiled["128"] != r["zero_shot_sets"]["skimage9"]["128"]
        assert r["other_domain"]["name"] == "fashion-mnist"
        if fmnist:
            assert 3 < r["other_domain"]["psnr"] < 60 and r["other_domain"]["note"].startswith("8 test images")
        else:
            assert r["other_domain"]["psnr"] is None and r["other_domain"]["note"].startswith("skipped")
    for name, groups in (("single", 1), ("g4", 4)):
        q = res[name]["quant_error"]
        assert 0 < q["held_out"] <= 4 and list(q["zero_shot"]) == ["16", "32", "64", "128"]
        assert all(0 < v <= 4 for v in q["zero_shot"].values())
        assert q["zero_shot"] == q["zero_shot_sets"]["imagenet20"] and list(q["zero_shot_sets"]) == list(
            run["zero_shot"]["sets"])
        assert len(q["by_group"]["held_out"]) == groups and len(q["by_group"]["skimage9/128"]) == groups
        assert q["zero_shot_sets"]["skimage9"]["128"] == pytest.approx(sum(q["by_group"]["skimage9/128"]) / groups)
        assert q["held_out"] == pytest.approx(sum(q["by_group"]["held_out"]) / groups)
    assert res["ae"]["quant_error"] is None and res["sdvae-f8c4"]["quant_error"] is None
    # the SD-VAE-shaped row: KL bottleneck, C=4, f8 (the first 4 width levels), next to the f16 rows
    def config(row):
        return TokenizerConfig.from_dict(json.loads((tmp_path / "seed0" / row / "final" / "config.json").read_text()))

    cfg = config("sdvae-f8c4")
    assert (cfg.quantizer, cfg.latent_dim, cfg.downsample, cfg.dcae["width_list"]) == ("kl", 4, 8, [8, 8, 8, 32])
    assert config("single").downsample == 16
    out = capsys.readouterr().out
    assert "zs 16    zs 32    zs 64   zs 128  f-mnist   quant error:" in out
    assert out.index("zero-shot set imagenet20") < out.index("zero-shot set skimage9") < out.index(
        "zero-shot set imagenet20 coded in independent 16 px tiles")
    cells = next(ln for ln in out.split("quant error = ")[1].splitlines() if ln.startswith("g4 ")).split()
    assert len(cells) == 13 and float(cells[2]) == pytest.approx(res["g4"]["zero_shot"]["16"], abs=0.006)
    assert float(cells[8]) == pytest.approx(res["g4"]["quant_error"]["zero_shot"]["16"], abs=6e-5)
    # an older results.json (no zero-shot keys) still prints, with "-" in the new columns
    old = {k: v for k, v in res["ae"].items()
           if k not in ("zero_shot", "zero_shot_set", "zero_shot_sets", "other_domain", "quant_error")}
    (tmp_path / "old.json").write_text(json.dumps({**run, "results": {"0": {"ae": old}}}))
    assert bench.main(["--from-results", str(tmp_path / "old.json"), "--rows", "ae"]) == 0
    last = capsys.readouterr().out.split("zero-shot set skimage9:")[1].splitlines()[2].split()
    assert last[0] == "ae" and last[2:] == ["-"] * 11


def test_explanation_rows_data_reuse_and_sets_a_row_trains_on(tmp_path, capsys):
    import numpy as np

    bench = _bench()
    # the explanation rows each change one thing about g8
    spec = bench.rows(1024)
    for name in bench.EXPLAIN_ROWS:
        diff = {k: v for k, v in spec[name]["model"].items() if spec["g8"]["model"].get(k) != v}
        extra = {k for k in spec[name] if k not in ("model", "what")}
        assert len(diff) + len(extra - {"trains_on"}) == 1, (name, diff, extra)
    # its own training data: a quarter of the crops grey, the rest the default crops unchanged
    x, _ = bench.train_images("grey", 400, 16, seed=0)
    ref, _ = bench.skimage_crops(400, 16, seed=0)
    grey = (x[..., 0] == x[..., 1]).all((1, 2)) & (x[..., 1] == x[..., 2]).all((1, 2))
    assert 0.18 < grey.mean() < 0.32 and (x[~grey] == ref[~grey]).all()
    x, labels = bench.train_images("diverse", 64, 16, seed=0)
    assert x.shape == (64, 16, 16, 3) and labels.max() >= 18  # CIFAR samples after the 18 photos
    with pytest.raises(ValueError, match="valid: grey, diverse"):
        bench.train_images("noisy", 4, 16, seed=0)
    args = ["--seeds", "0", "--rows", "g8-diverse", "g8-crop2x", "--steps", "2", "--batch-size", "4",
            "--num-crops", "16", "--eval-crops", "4", "--widths", "8", "8", "32", "--image-size", "16",
            "--out", str(tmp_path)]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"]["0"]
    d = res["g8-diverse"]
    assert d["zero_shot_sets"]["skimage9"] is None and d["quant_error"]["zero_shot_sets"]["skimage9"] is None
    assert d["zero_shot_tiled_sets"]["skimage9"] is None and d["zero_shot_tiled_sets"]["imagenet20"]
    assert d["zero_shot_set"] == "imagenet20" and not any(k.startswith("skimage9/") for k in d["quant_error"]["by_group"])
    cfg = json.loads((tmp_path / "seed0" / "g8-crop2x" / "final" / "config.json").read_text())
    assert cfg["image_size"] == 32 and not res["g8-crop2x"]["reused"]
    assert (tmp_path / "seed0" / "data-diverse-16x16" / "dataset_info.json").exists()
    # --reuse: rescored, not retrained (same weights -> same held-out PSNR)
    capsys.readouterr()
    assert bench.main(args + ["--reuse"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())["results"]["0"]
    assert again["g8-crop2x"]["reused"] and again["g8-crop2x"]["seconds"] is None
    assert again["g8-crop2x"]["psnr"] == res["g8-crop2x"]["psnr"]
    assert "tokenizer mgvq-dcae-tiny" not in capsys.readouterr().out  # nothing trained
    assert bench.main(["--from-results", str(tmp_path / "results.json"), "--rows", "g8-diverse"]) == 0
    block = capsys.readouterr().out.split("zero-shot set skimage9")[1].splitlines()[2].split()
    assert block[0] == "g8-diverse" and block[2:6] == ["-"] * 4
