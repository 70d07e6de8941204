"""DC-AE backbone + released-MGVQ converter: the reference fixture (MKJia/MGVQ f76c2dd5, G=4), the released presets'
parameter counts (reference A.1), and a few CPU training steps of the tiny DC-AE tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from tokenizer.convert_mgvq import _usage_window, convert_mgvq_tokenizer, infer_mgvq_config, main
from tokenizer.dcae import RELEASED_PRESETS, DCAEConfig, DCAEDecoder, DCAEEncoder, LiteMLA, RMSNorm2d
from tokenizer.model import MGVQTokenizer

from _paths import FIXTURES
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs: one thread is ~10x faster than two on a shared, loaded CPU (and reproduces the reference bit for
    bit)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fixture():
    path = FIXTURES / "mgvq_tokenizer.safetensors"
    from safetensors.torch import load_file

    t = load_file(str(path))
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    meta = json.loads((FIXTURES / "mgvq_tokenizer.json").read_text())
    return t, sd, meta


@pytest.fixture(scope="module")
def converted(fixture):
    _, sd, _ = fixture
    return convert_mgvq_tokenizer(sd)


def test_fixture_config_inferred(fixture, converted):
    _, sd, meta = fixture
    ref = meta["constructor"]["resolved_MGVQConfig"]
    cfg = converted.config
    d = cfg.dcae
    assert d["width_list"][1:] == ref["encoder"]["width_list"][1:]  # stage 0 is empty: its width is unused
    assert d["encoder_depth_list"] == ref["encoder"]["depth_list"]
    assert d["decoder_depth_list"] == ref["decoder"]["depth_list"]
    assert d["block_type"] == ref["encoder"]["block_type"] == ref["decoder"]["block_type"]
    assert d["decoder_norm"] == ref["decoder"]["norm"] and d["decoder_act"] == ref["decoder"]["act"]
    assert (d["encoder_norm"], d["encoder_act"]) == (ref["encoder"]["norm"], ref["encoder"]["act"])
    assert (d["decoder_out_norm"], d["decoder_out_act"]) == (ref["decoder"]["out_norm"], ref["decoder"]["out_act"])
    assert (cfg.latent_dim, cfg.groups, cfg.codebook_size) == (32, 4, 32) and cfg.grouped_quant_conv
    assert cfg.downsample == 16
    # every reference weight is ours under the same name (identity mapping), BatchNorm buffers included
    ours = converted.state_dict()
    assert set(sd) == set(ours)
    for k, v in sd.items():
        if k != "quantize.codebook_used":
            assert torch.equal(ours[k].to(v.dtype), v), k
    assert (ours["quantize.codebook_used"] == -1).all()  # the reference's never-filled (all-zero) queue -> empty


def test_fixture_encoder_indices_and_reconstructions(fixture, converted):
    t, _, _ = fixture
    x = t["x"]
    with torch.no_grad():
        enc = converted.encoder(x)
        torch.testing.assert_close(enc, t["enc_out"], **TOL)
        torch.testing.assert_close(converted.quant_conv(enc), t["pre_quant"], **TOL)
        idx = converted.encode(x)
        assert idx.shape == (2, 4, 4, 4) and idx.dtype == torch.int64
        assert torch.equal(idx, t["indices_bhwg"])
        assert torch.equal(idx.reshape(-1, 4), t["indices"])  # (B*h*w, G) raster order, local per group
        out = converted(x)
        torch.testing.assert_close(out.recon, t["recon_forward"], **TOL)
        assert torch.equal(out.indices, t["indices_bhwg"]) and out.keep_groups == 4
        torch.testing.assert_close(converted.quantize.lookup(idx), t["quant"], **TOL)
        for k in (1, 2, 4):  # the reference zeroes groups >= groups_to_use in the latent before post_quant_conv
            rec = converted.decode(t["indices_bhwg"], groups_to_use=k)
            torch.testing.assert_close(rec, t[f"recon_decode_code_g{k}"], **TOL)
        assert (converted.decode(idx, 1) - converted.decode(idx, 4)).abs().max() > 0.05  # the masking matters


def test_convert_cli_roundtrip(fixture, tmp_path):
    t, sd, _ = fixture
    ckpt = tmp_path / "mgvq_tiny.pt"
    torch.save({"model": sd, "args": {"note": "released files carry the weights under 'model'"}}, ckpt)
    out = tmp_path / "converted"
    assert main([str(ckpt), str(out), "image_size=64", "dcae.decoder_out_act=relu"]) == 0
    tok = MGVQTokenizer.from_pretrained(str(out))
    assert tok.config.image_size == 64 and tok.config.groups == 4
    with torch.no_grad():
        assert torch.equal(tok.encode(t["x"]), t["indices_bhwg"])
        torch.testing.assert_close(tok.decode(t["indices_bhwg"], 2), t["recon_decode_code_g2"], **TOL)


def test_converter_errors_and_buffers(fixture):
    _, sd, _ = fixture
    with pytest.raises(KeyError, match="quant_conv.weight"):
        infer_mgvq_config({k: v for k, v in sd.items() if k != "quant_conv.weight"})
    bad = dict(sd)
    bad["quantize.embedding.weight"] = torch.randn(130, 8)  # not a multiple of G=4
    with pytest.raises(ValueError, match="multiple of groups"):
        infer_mgvq_config(bad)
    with pytest.raises(ValueError, match="unknown TokenizerConfig field"):
        convert_mgvq_tokenizer(sd, {"no_such_field": 1})
    # a filled reference queue (chronological, float) -> ring buffer keeping the newest entries
    q = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert _usage_window(q, 2, 3).tolist() == [[1, 0, 2], [-1, -1, -1]]
    assert _usage_window(q, 2, 5).tolist() == [[-1, 3, 1, 0, 2], [-1, -1, -1, -1, -1]]
    used = dict(sd)
    used["quantize.codebook_used"] = torch.arange(4 * 65536).remainder(32).float().view(4, 65536)
    used["quantize.embed_prob"] = torch.full((4, 32), 1 / 32)
    tok = convert_mgvq_tokenizer(used)
    assert torch.allclose(tok.quantize.usage(), torch.ones(4))
    assert torch.equal(tok.quantize.embed_prob, used["quantize.embed_prob"])


def test_released_preset_parameter_counts():
    # reference A.1 (built from the original classes): total and encoder / decoder splits, in millions
    expected = {"mgvq_f8c32_g4": (128.2, 52.0, 75.9), "mgvq_f16c32_g4": (216.0, 87.07, 128.69),
                "mgvq_f16c32_g8": (215.8, 87.07, 128.69), "mgvq_f16c32_g4_mix": (216.0, 87.07, 128.69),
                "mgvq_f32c32_g8_mix": (323.4, 123.2, 200.2)}
    for name, (total, enc, dec) in expected.items():
        with torch.device("meta"):
            tok = MGVQTokenizer.from_preset(name)
        n_enc = sum(p.numel() for p in tok.encoder.parameters()) / 1e6
        n_dec = sum(p.numel() for p in tok.decoder.parameters()) / 1e6
        digits = len(str(enc).split(".")[1])
        assert round(tok.num_parameters() / 1e6, 1) == total, name
        assert (round(n_enc, digits), round(n_dec, digits)) == (enc, dec), name
        assert tok.config.downsample == {"f8": 8, "f16": 16, "f32": 32}[name.split("_")[1][:-3]]
    # G from quant_conv, K from the embedding: G4 = 4 x 8192 codes of dim 8, G8 = 8 x 2048 of dim 4
    for name, (G, K) in {"mgvq_f8c32_g8": (8, 2048), "mgvq_f16c32_g4": (4, 8192)}.items():
        with torch.device("meta"):
            tok = MGVQTokenizer.from_preset(name)
        assert tok.quantize.embedding.weight.shape == (G * K, 32 // G)
        assert tok.quant_conv.weight.shape == (32, 32 // G, 1, 1)
        # the converter recovers the preset's architecture from the (meta) state_dict alone
        inferred = infer_mgvq_config(tok.state_dict())
        assert inferred["dcae"] == {**RELEASED_PRESETS[name]["dcae"], "decoder_out_norm": "trms2d",
                                    "decoder_out_act": "relu", "in_channels": 3, "expand_ratio": 4}
        assert (inferred["groups"], inferred["codebook_size"]) == (G, K)
    with torch.device("meta"):
        assert len(MGVQTokenizer.from_preset("mgvq_f16c32_g4").state_dict()) == 297  # reference A.5 entry count


def test_blocks_numerics():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5)
    n = RMSNorm2d(6)
    torch.nn.init.normal_(n.weight)
    torch.nn.init.normal_(n.bias)
    ref = x / x.pow(2).mean(1, keepdim=True).add(1e-5).sqrt() * n.weight[:, None, None] + n.bias[:, None, None]
    torch.testing.assert_close(n(x), ref)
    # LiteMLA: linear (H*W > 32) and quadratic (H*W <= 32) forms are the same ReLU attention, within eps effects
    mla = LiteMLA(64, "trms2d").eval()
    for hw in ((4, 4), (8, 8)):
        xx = torch.randn(1, 64, *hw)
        qkv = mla.qkv(xx).reshape(1, 2, 96, -1)
        q, k, v = qkv[:, :, :32].relu(), qkv[:, :, 32:64].relu(), qkv[:, :, 64:]
        att = k.transpose(-1, -2) @ q
        out = v @ (att / (att.sum(2, keepdim=True) + 1e-15))
        torch.testing.assert_close(mla(xx), mla.proj(out.reshape(1, 64, *hw)), atol=1e-4, rtol=1e-4)


def test_config_errors():
    with pytest.raises(ValueError, match="decoder_norm has invalid entries"):
        DCAEConfig(width_list=[8, 16], encoder_depth_list=[0, 1], decoder_depth_list=[0, 1],
                   block_type=["ResBlock"] * 2, decoder_norm=["ln2d", "bn2d"], decoder_act="relu")
    with pytest.raises(ValueError, match="encoder_depth_list must have one entry per stage"):
        DCAEConfig(width_list=[8, 16, 32], encoder_depth_list=[0, 1], decoder_depth_list=[0, 1, 1],
                   block_type="ResBlock", decoder_norm="bn2d", decoder_act="relu")
    with pytest.raises(ValueError, match="multiple of attn_head_dim"):
        DCAEConfig(width_list=[12, 24, 48], encoder_depth_list=[0, 1, 1], decoder_depth_list=[0, 1, 1],
                   block_type=["ResBlock", "ResBlock", "EViT_GLU"], decoder_norm="trms2d", decoder_act="silu")
    cfg = DCAEConfig(width_list=[8, 16, 32], encoder_depth_list=[1, 1, 1], decoder_depth_list=[1, 1, 1],
                     block_type="ResBlock", decoder_norm="bn2d", decoder_act="relu")
    x = torch.randn(1, 3, 16, 16)
    z = DCAEEncoder(cfg, 16)(x)  # non-empty stage 0: project_in is a plain conv, f = 4 all the same
    assert z.shape == (1, 16, 4, 4) and cfg.downsample == 4
    assert DCAEDecoder(cfg, 16)(z).shape == x.shape


def test_tiny_dcae_trains_on_cpu():
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-dcae-tiny", nested_keep_probs=None)
    assert tok.config.downsample == 4 and tok.config.image_size == 32
    assert tok.num_parameters() < 500_000
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)  # smooth images: learnable at this scale
    opt = torch.optim.AdamW(tok.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    tok.train()
    losses = []
    for _ in range(25):
        out = tok(x)
        rec = (out.recon - x).pow(2).mean()
        loss = rec + out.vq_loss.sum() + out.commit_loss.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.grad is not None)
        opt.step()
        losses.append(rec.item())
    assert out.indices.shape == (8, 8, 8, 4) and out.keep_groups == 4
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    tok.eval()
    with torch.no_grad():
        idx = tok.encode(x)
        assert idx.shape == (8, 8, 8, 4) and 0 <= idx.min() and idx.max() < 256
        assert tok.decode(idx).shape == x.shape
