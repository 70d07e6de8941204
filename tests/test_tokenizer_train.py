"""Stage-one training script: learning on real photos, exact resume, loud config errors, non-finite handling."""
import json
import math

import pytest
import torch

from tokenizer import MGVQTokenizer
from tokenizer.data import skimage_crops
from tokenizer.train import load_config, main


@pytest.fixture(autouse=True)
def one_thread():
    # the CI / dev machine has 2 shared cores; 2 intra-op threads thrash under load (measured ~15x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _eval_l2(tok, x):
    with torch.no_grad():
        return torch.nn.functional.mse_loss(tok.eval()(x, keep_groups=tok.config.groups).recon, x).item()


FAST = ["data=skimage", "num_crops=1024", "model=mgvq-tiny", "model_overrides.vqgan.ch=16", "batch_size=8",
        "precision=fp32", "num_samples=4"]


def test_tiny_learns_and_uses_all_groups(tmp_path):
    out = tmp_path / "run"
    # reinit_decay 0.1 (reference 0.01): the CVQ usage EMA reacts within ~20 steps, so dead codes are recycled in a
    # 200-step run (with 0.01 usage dips to ~45% and only recovers after a few hundred steps)
    main(FAST + ["steps=200", "model_overrides.reinit_decay=0.1", "log_every=10", "sample_every=100", "save_every=200",
                 "loss.perceptual_weight=0", "loss.disc_weight=0", f"out_dir={out}"])
    m = _metrics(out)
    assert len(m) == 20 and m[-1]["step"] == 200
    # held-out crops (another seed) reconstruct better after training than at init
    held = torch.from_numpy(skimage_crops(32, 32, seed=123)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    init = MGVQTokenizer.from_preset("mgvq-tiny", **{"vqgan.ch": 16})
    tok = MGVQTokenizer.from_pretrained(str(out / "final"))
    before, after = _eval_l2(init, held), _eval_l2(tok, held)
    assert after < 0.5 * before, (before, after)
    # every sub-codebook stays alive: > 50% of its 256 codes used in the sliding window
    assert len(m[-1]["usage"]) == 4 and min(m[-1]["usage"]) > 0.5, m[-1]["usage"]
    assert m[-1]["psnr"] > m[0]["psnr"] + 3
    assert (out / "samples" / "step_00000100.png").exists() and (out / "samples" / "step_00000200.png").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 200 and summary["final"] == str(out / "final")


def test_resume_gives_same_losses(tmp_path, lpips_weights_dir):
    # full loss: L2 + Charbonnier + LPIPS + codebook, PatchGAN switched on at step 2, nested masking, dead-code re-init
    common = FAST + ["batch_size=4", "log_every=1", "save_every=3", "sample_every=100", "loss.disc_start=2",
                     f"lpips_dir={lpips_weights_dir}", "ema=true", "ema_decay=0.9"]
    a, b = tmp_path / "a", tmp_path / "b"
    main(common + ["steps=6", f"out_dir={a}"])
    main(common + ["steps=3", f"out_dir={b}"])  # "interrupted" after step 3 (checkpoint written)
    main(common + ["steps=6", f"out_dir={b}"])  # resume=auto picks up checkpoints/step_00000003
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(ma, mb):
        for k in ("total", "l2", "charbonnier", "perceptual", "vq", "commit", "g_adv", "keep_groups", "perplexity",
                  "usage"):  # usage too: the ring-buffer position is saved with the checkpoint
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
        if ra["step"] > 2:
            assert ra["d_loss"] == rb["d_loss"] and ra["g_adv"] != 0.0
    assert ma[-1]["perceptual"] > 0
    sa = MGVQTokenizer.from_pretrained(str(a / "final")).state_dict()
    sb = MGVQTokenizer.from_pretrained(str(b / "final")).state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []  # weights, codebook, usage window: identical
    ea = MGVQTokenizer.from_pretrained(str(a / "final_ema")).state_dict()
    assert any(not torch.equal(ea[k], sa[k]) for k in sa)  # EMA weights differ from the raw ones


def test_config_errors_are_loud(tmp_path):
    with pytest.raises(ValueError, match="exactly one of steps / epochs"):
        load_config(None, ["steps=10", "epochs=1"])
    with pytest.raises(ValueError, match=r"training config: unknown key\(s\): stepz \(did you mean steps\?\)"):
        load_config(None, ["stepz=10"])
    with pytest.raises(ValueError, match=r"unknown loss field\(s\) \['disc_begin'\]"):
        load_config(None, ["steps=1", "loss.disc_begin=5"])
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        load_config(None, ["steps=1", "batch_size=0"])
    with pytest.raises(ValueError, match="unknown tokenizer preset 'mgvq-tinny'.*Did you mean: mgvq-tiny"):
        main(["steps=1", "model=mgvq-tinny", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"latent_dim \(30\) must be a positive multiple of groups \(4\)"):
        main(["steps=1", "model_overrides.latent_dim=30", f"out_dir={tmp_path}"])
    cfg = load_config("configs/tokenizer/vqgan-f16-g8-imagenet-ablation.yaml")
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.betas, cfg.epochs) == ("mgvq-f16-g8", 16, 1e-4, (0.9, 0.95), 40)
    assert (cfg.loss_config().disc_start, cfg.loss_config().disc_weight) == (20000, 0.5)
    tiny = load_config("configs/tokenizer/tiny.yaml", ["steps=7", "loss.disc_weight=0"])
    assert tiny.steps == 7 and tiny.loss_config().disc_weight == 0
    assert tiny.data == "/usr/share/datasets/fashion-mnist" and tiny.data_split in (None, "train")


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    import tokenizer.losses as losses

    real = losses.l2_loss
    calls = {"n": 0}

    def flaky_l2(x, y):  # steps 2 and 3 produce NaN; the run must skip them and continue
        calls["n"] += 1
        v = real(x, y)
        return v * float("nan") if calls["n"] in (2, 3) else v

    monkeypatch.setattr(losses, "l2_loss", flaky_l2)
    out = tmp_path / "nan"
    main(FAST + ["steps=5", "batch_size=2", "log_every=1", "loss.perceptual_weight=0", "loss.disc_weight=0",
                 f"out_dir={out}"])
    m = _metrics(out)
    assert [r["skipped_steps"] for r in m] == [0, 1, 2, 2, 2]
    assert math.isfinite(m[-1]["total"])
    monkeypatch.setattr(losses, "l2_loss", lambda x, y: real(x, y) * float("nan"))
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row \(max_nonfinite=3\) at steps 1..3"):
        main(FAST + ["steps=5", "batch_size=2", "max_nonfinite=3", "loss.perceptual_weight=0", "loss.disc_weight=0",
                     f"out_dir={tmp_path / 'nan2'}"])


def test_every_tokenizer_config_uses_the_current_vocabulary():
    import glob
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated key would warn
        for path in sorted(glob.glob("configs/tokenizer/*.yaml")):
            load_config(path, ["steps=1", "epochs=null"])
