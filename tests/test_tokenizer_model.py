import json

import pytest
import torch

from tokenizer import PRESETS, MGVQTokenizer, TokenizerConfig, TokenizerOutput
from tokenizer.model import preset_config


def _tiny(**overrides):
    torch.manual_seed(0)
    return MGVQTokenizer.from_preset("mgvq-tiny", **overrides)


def test_encode_decode_forward_shapes_and_contract():
    tok = _tiny().eval()
    cfg = tok.config
    assert (cfg.groups, cfg.codebook_size, cfg.latent_dim, cfg.downsample, cfg.grid()) == (4, 256, 32, 4, 8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    idx = tok.encode(x)
    assert idx.dtype == torch.int64 and idx.shape == (2, 8, 8, 4)
    assert idx.min() >= 0 and idx.max() < cfg.codebook_size
    rec = tok.decode(idx)
    assert rec.shape == (2, 3, 32, 32)
    out = tok(x)
    assert isinstance(out, TokenizerOutput)
    assert torch.equal(out.indices, idx) and out.keep_groups == 4
    torch.testing.assert_close(out.recon, rec, atol=1e-5, rtol=1e-5)
    assert out.vq_loss.shape == out.commit_loss.shape == out.usage.shape == out.perplexity.shape == (4,)
    assert tok.codebook().shape == (4, 256, 8)
    assert torch.equal(tok.codebook(), tok.quantize.embedding.weight.view(4, 256, 8))
    # non-square inputs
    assert tok.encode(torch.zeros(1, 3, 16, 32)).shape == (1, 4, 8, 4)


def test_decode_groups_to_use_zeroes_trailing_groups():
    tok = _tiny().eval()
    idx = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    for k in (1, 2, 3):
        other = idx.clone()
        other[..., k:] = torch.randint(0, 256, other[..., k:].shape)  # trailing groups must not matter
        a, b = tok.decode(idx, groups_to_use=k), tok.decode(other, groups_to_use=k)
        torch.testing.assert_close(a, b)
        lat = tok.quantize.lookup(idx, groups_to_use=k)
        torch.testing.assert_close(a, tok.decode_latent(lat))
        assert (lat[:, 8 * k:] == 0).all()
    assert not torch.allclose(tok.decode(idx, groups_to_use=1), tok.decode(idx))


def test_training_forward_masks_and_gradients_reach_encoder():
    tok = _tiny().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x, keep_groups=2)
    assert out.indices.shape == (2, 8, 8, 2) and (out.vq_loss[2:] == 0).all() and (out.vq_loss[:2] > 0).all()
    loss = (out.recon - x).pow(2).mean() + out.vq_loss.sum() + out.commit_loss.sum()
    loss.backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quant_conv.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0
    torch.manual_seed(0)
    ks = {tok.quantize.sample_keep_groups() for _ in range(100)}  # nested masking is on in the preset
    assert ks == {1, 2, 3, 4}


def test_tiny_model_learns():
    torch.manual_seed(0)
    tok = _tiny(nested_keep_probs=None).train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x = torch.nn.functional.avg_pool2d(x, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)  # learnable blocks
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention on a shared CPU
    try:
        for _ in range(30):
            out = tok(x)
            rec = (out.recon - x).pow(2).mean()
            (rec + out.vq_loss.sum() + out.commit_loss.sum()).backward()
            opt.step()
            opt.zero_grad()
            losses.append(rec.item())
    finally:
        torch.set_num_threads(threads)
    print(f"tiny recon mse: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_round_trip(tmp_path):
    tok = _tiny(dead_code_reinit=False).train()
    tok(torch.rand(2, 3, 32, 32) * 2 - 1)  # fill the usage buffers
    tok.eval()
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["groups"] == 4 and cfg["vqgan"]["ch_mult"] == [1, 2, 4]
    tok2 = MGVQTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert not tok2.training and tok2.config == tok.config
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), tok2.encode(x))
    assert torch.equal(tok(x).recon, tok2(x).recon)
    assert torch.equal(tok.quantize.codebook_used, tok2.quantize.codebook_used)
    for (k, a), (_, b) in zip(tok.state_dict().items(), tok2.state_dict().items()):
        assert torch.equal(a, b), k


def test_grouped_quant_conv():
    tok = _tiny(**{"grouped_quant_conv": True, "vqgan.z_channels": 32})
    assert tok.quant_conv.weight.shape == (32, 8, 1, 1) and tok.quant_conv.bias is not None
    assert tok.post_quant_conv.weight.shape == (32, 8, 1, 1)
    assert tok.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8, 4)


def test_preset_parameter_counts_on_meta():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            tok = MGVQTokenizer.from_preset(name)
        enc = sum(p.numel() for p in tok.encoder.parameters())
        dec = sum(p.numel() for p in tok.decoder.parameters())
        counts[name] = (tok.num_parameters(), enc, dec)
        print(f"{name:>14}: {tok.num_parameters() / 1e6:7.2f}M (enc {enc / 1e6:.2f}M, dec {dec / 1e6:.2f}M), "
              f"f{tok.config.downsample}, G={tok.config.groups}, K={tok.config.codebook_size}")
    total, enc, dec = counts["llamagen-vq16"]
    assert round(total / 1e6, 2) == 71.88 and round(enc / 1e6, 2) == 29.30 and round(dec / 1e6, 2) == 42.45
    assert round(counts["llamagen-vq8"][0] / 1e6, 2) == 70.11
    assert counts["mgvq-tiny"][0] < 2e6
    # MGVQ presets: same VQGAN backbone, codebook G*K x C/G, quant convs 256 <-> 32
    assert counts["mgvq-f16-g4"][0] == total - 16384 * 8 - (256 * 8 + 8) - (8 * 256 + 256) + 32768 * 8 \
        + (256 * 32 + 32) + (32 * 256 + 256)
    cfgs = {n: preset_config(n) for n in PRESETS}
    assert (cfgs["mgvq-f16-g8"].groups, cfgs["mgvq-f16-g8"].codebook_size) == (8, 2048)
    assert cfgs["mgvq-f8-g4"].downsample == 8 and cfgs["mgvq-f16-g4"].downsample == 16
    assert cfgs["mgvq-f16-g4"].nested_keep_probs == pytest.approx([0.2, 0.1, 0.1, 0.6])


def test_overrides():
    cfg = preset_config("mgvq-tiny", **{"vqgan.ch": 8, "codebook_size": 64, "vqgan": {"num_res_blocks": 2}})
    assert cfg.vqgan.ch == 8 and cfg.vqgan.num_res_blocks == 2 and cfg.codebook_size == 64
    assert cfg.vqgan.ch_mult == (1, 2, 4)  # untouched fields kept
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"latent_dim \(30\) must be a positive multiple of groups \(4\)"):
        TokenizerConfig(latent_dim=30, groups=4)
    with pytest.raises(ValueError, match="codebook_size"):
        TokenizerConfig(codebook_size=1)
    with pytest.raises(ValueError, match="backbone must be one of"):
        TokenizerConfig(backbone="vit")
    with pytest.raises(ValueError, match="one probability per k"):
        TokenizerConfig(groups=4, nested_keep_probs=[0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        TokenizerConfig(groups=2, latent_dim=8, nested_keep_probs=[0.5, 0.6])
    with pytest.raises(ValueError, match="grouped_quant_conv"):
        TokenizerConfig(grouped_quant_conv=True)  # z_channels 256 != latent_dim 32
    with pytest.raises(ValueError, match="needs dcae"):
        TokenizerConfig(backbone="dcae")
    with pytest.raises(ValueError, match="vqgan.ch_mult"):
        TokenizerConfig(vqgan={"ch_mult": []})
    with pytest.raises(ValueError, match=r"unknown TokenizerConfig field\(s\) \['codebooksize'\]"):
        preset_config("mgvq-tiny", codebooksize=3)
    with pytest.raises(ValueError, match=r"unknown vqgan field\(s\) \['channels'\]"):
        preset_config("mgvq-tiny", **{"vqgan.channels": 3})
    with pytest.raises(ValueError, match="Did you mean: mgvq-f16-g4"):
        MGVQTokenizer.from_preset("mgvq-f16g4")
    with pytest.raises(ValueError, match="multiple of the downsample"):
        TokenizerConfig(image_size=100)
    with pytest.raises(ValueError, match="multiples of 4"):
        _tiny().encode(torch.zeros(1, 3, 30, 32))


def test_ema_codebook_through_the_config_and_a_save_load_round_trip(tmp_path):
    with pytest.raises(ValueError, match="codebook_update must be one of"):
        MGVQTokenizer.from_preset("mgvq-tiny", codebook_update="kmeans")
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", image_size=16, codebook_update="ema", ema_decay=0.9).train()
    w0 = tok.quantize.embedding.weight.detach().clone()
    out = tok(torch.rand(4, 3, 16, 16) * 2 - 1)
    (out.recon.pow(2).mean() + out.commit_loss.sum()).backward()
    assert tok.quantize.embedding.weight.grad is None and not torch.equal(tok.quantize.embedding.weight, w0)
    tok.save_pretrained(str(tmp_path))
    back = MGVQTokenizer.from_pretrained(str(tmp_path))
    assert back.config.codebook_update == "ema" and back.config.ema_decay == 0.9
    assert torch.equal(back.quantize.ema_sum, tok.quantize.ema_sum)
    assert torch.equal(back.quantize.embedding.weight, tok.quantize.embedding.weight)
