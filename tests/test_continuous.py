"""Continuous baselines in the tokenizer (quantizer "none" = plain autoencoder, "kl" = SD-VAE-style VAE): same
encoder / decoder / latent C, trained by tokenizer.train with the same losses, evaluated by `mgvq evaluate-tokenizer`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import MGVQTokenizer
from tokenizer.data import skimage_crops
from tokenizer.losses import LossConfig, TokenizerLoss
from tokenizer.model import TokenizerConfig
from tokenizer.train import main as train_main


def _x(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_vae_forward_shapes_sampling_and_kl():
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", quantizer="kl")
    x = _x()
    assert tok.config.nested_keep_probs is None and not tok.is_quantized
    assert tok.quant_conv.out_channels == 2 * tok.config.latent_dim  # mean and log-variance
    assert not any(k.startswith("quantize.") for k in tok.state_dict())
    out = tok.train()(x)
    assert out.recon.shape == x.shape and out.indices is None and out.keep_groups == 0
    assert out.usage.numel() == out.vq_loss.numel() == out.perplexity.numel() == 0
    # the KL matches its closed form on the predicted moments
    with torch.no_grad():
        mean, logvar = tok.quant_conv(tok.encoder(x)).chunk(2, dim=1)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(out.kl_loss, kl)
    assert out.kl_loss > 0
    # training samples (two forwards differ), eval uses the mean (deterministic, = decode_latent(encode_latent(x)))
    assert not torch.equal(tok(x).recon, tok(x).recon)
    tok.eval()
    with torch.no_grad():
        a, b = tok(x).recon, tok.decode_latent(tok.encode_latent(x))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(tok.encode_latent(x), mean)


def test_plain_autoencoder_is_a_pass_through():
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", quantizer="none")
    x = _x()
    out = tok.train()(x)
    assert out.recon.shape == x.shape and out.kl_loss is None and out.indices is None
    torch.testing.assert_close(out.recon, tok.decode_latent(tok.encode_latent(x)))
    assert tok.encode_latent(x).shape == (2, tok.config.latent_dim, 8, 8)
    # same encoder / decoder as the VQ model: every backbone weight name and shape is shared
    vq = MGVQTokenizer.from_preset("mgvq-tiny").state_dict()
    ae = tok.state_dict()
    assert {k: v.shape for k, v in ae.items()} == {k: v.shape for k, v in vq.items() if not k.startswith("quantize.")}


@pytest.mark.parametrize("q", ["none", "kl"])
def test_index_api_refuses_continuous_tokenizers(q):
    tok = MGVQTokenizer.from_preset("mgvq-tiny", quantizer=q)
    with pytest.raises(ValueError, match=f"quantizer='{q}'.*encode_latent"):
        tok.encode(_x())
    with pytest.raises(ValueError, match=f"quantizer='{q}'.*decode_latent"):
        tok.decode(torch.zeros(1, 8, 8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook needs a vector-quantized tokenizer"):
        tok.codebook()
    with pytest.raises(ValueError, match="keep_groups=2 needs quantizer='vq'"):
        tok(_x(), keep_groups=2)
    with pytest.raises(ValueError, match=r"quantizer must be one of \('vq', 'none', 'kl'\), got 'fsq'"):
        TokenizerConfig(quantizer="fsq")


def test_kl_weight_enters_the_total_loss():
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", quantizer="kl").train()
    x = _x()
    out = tok(x)
    base = dict(perceptual_weight=0, disc_weight=0)
    t0, terms0 = TokenizerLoss(LossConfig(kl_weight=0.0, **base)).generator_loss(x, out, 0)
    t1, terms1 = TokenizerLoss(LossConfig(kl_weight=0.5, **base)).generator_loss(x, out, 0)
    assert terms0["kl"] == pytest.approx(out.kl_loss.item() / (3 * 32 * 32), rel=1e-6)  # per pixel value
    assert float((t1 - t0).detach()) == pytest.approx(0.5 * terms0["kl"], rel=1e-5)
    assert terms0["vq"] == terms0["commit"] == 0.0
    with pytest.raises(ValueError, match="kl_weight"):
        LossConfig(kl_weight=-1)


@pytest.mark.parametrize("q", ["none", "kl"])
def test_continuous_baselines_train_save_and_evaluate(tmp_path, q, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["data=skimage", "num_crops=256", "model=mgvq-tiny", f"model_overrides.quantizer={q}",
            "model_overrides.vqgan.ch=8", "batch_size=8", "lr=2e-3", "precision=fp32", "num_samples=2",
            "log_every=10", "sample_every=120", "save_every=60", "loss.perceptual_weight=0", "loss.disc_weight=0",
            "loss.kl_weight=1e-3", f"out_dir={out}"]
    train_main(args + ["steps=120"])
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(r["usage"] == [] and r["keep_groups"] == 0 and r["vq"] == 0 for r in m)
    assert (m[-1]["kl"] > 0) == (q == "kl")
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1].endswith("120")
    train_main(args + ["steps=130"])  # resumes from the step-120 checkpoint (no usage window to restore)
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in m][-3:] == [110, 120, 130]
    tok = MGVQTokenizer.from_pretrained(str(out / "final"))  # after 130 steps
    assert tok.config.quantizer == q and not tok.is_quantized
    # it learns: held-out crops reconstruct much better than with the untrained weights
    held = torch.from_numpy(skimage_crops(64, 32, seed=123)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    init = MGVQTokenizer.from_preset("mgvq-tiny", quantizer=q, **{"vqgan.ch": 8}).eval()
    with torch.no_grad():
        mse0, mse1 = (torch.nn.functional.mse_loss(t(held).recon, held).item() for t in (init, tok))
    assert mse1 < 0.15 < 0.4 * mse0, (mse0, mse1)  # 0.15: about half the MSE of predicting the mean colour

    # mgvq evaluate-tokenizer: reported like a VQ model, usage / coarse-to-fine simply absent
    from pipelines import evaluate_tokenizer as R
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.png")
    monkeypatch.setenv("MGVQ_LPIPS_DIR", str(tmp_path / "no_lpips"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert R.main(["--tokenizer", str(out / "final"), "--data", str(photos), "--resolution", "32",
                   "--batch-size", "2", "--num-examples", "1", "--out", str(tmp_path / "eval")]) == 0
    res = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert res["quantizer"] == q and res["groups"] == 0 and res["num_images"] == 3
    assert 10 < res["psnr_of_mean_mse"] < 60 and 0 < res["ssim"] <= 1
    assert not any(k.startswith(("codebook_", "codes_used", "psnr_of_mean_mse_by")) for k in res)
    assert "PSNR (dataset-mean MSE, MGVQ)" in capsys.readouterr().out
