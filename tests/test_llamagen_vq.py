"""LlamaGen VQModel fixture (FoundationVision/LlamaGen ce98ec41, tiny ch=32, ch_mult [1, 2], K=128, C=8)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import MGVQTokenizer
from tokenizer.convert import convert_llamagen_vq, infer_llamagen_config, load_checkpoint_state_dict, main

from _paths import FIXTURES

FIXTURE = FIXTURES / "llamagen_vq.safetensors"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ref():
    t = load_file(FIXTURE)
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    return t, sd


def _check(tok, t):
    x = t["x"]
    with torch.no_grad():
        torch.testing.assert_close(tok.encoder(x), t["enc_out"], **TOL)
        torch.testing.assert_close(tok.encode_latent(x), t["pre_quant"], **TOL)
        q = tok.quantize(tok.encode_latent(x))
        torch.testing.assert_close(q.z_q, t["quant"], **TOL)
        idx = tok.encode(x)
        assert idx.shape == (2, 16, 16, 1) and idx.dtype == torch.int64
        assert torch.equal(idx[..., 0], t["indices_bhw"])
        assert torch.equal(idx.reshape(-1), t["indices"])  # raster (b, h, w) order
        torch.testing.assert_close(torch.nn.functional.normalize(tok.codebook()[0], dim=-1),
                                   t["codebook_normalized"], **TOL)
        torch.testing.assert_close(tok(x).recon, t["recon_forward"], **TOL)
        torch.testing.assert_close(tok.decode(idx), t["recon_decode_code"], **TOL)


def test_infer_config(ref):
    _, sd = ref
    cfg = infer_llamagen_config(sd)
    assert cfg["vqgan"] == dict(ch=32, ch_mult=[1, 2], num_res_blocks=2, z_channels=32, in_channels=3)
    assert (cfg["latent_dim"], cfg["groups"], cfg["codebook_size"]) == (8, 1, 128)


def test_convert_reproduces_reference(ref):
    t, sd = ref
    tok = convert_llamagen_vq(sd, {"image_size": 32})
    assert not tok.training and tok.config.downsample == 2 and tok.config.image_size == 32
    assert tok.num_parameters() == sum(v.numel() for k, v in sd.items() if k != "quantize.codebook_used")
    _check(tok, t)


def test_convert_rejects_mismatch(ref):
    _, sd = ref
    with pytest.raises(ValueError, match="groups must stay 1"):
        convert_llamagen_vq(sd, {"groups": 2, "latent_dim": 8})
    with pytest.raises(ValueError, match="missing"):
        convert_llamagen_vq(sd, {"vqgan.num_res_blocks": 1})
    with pytest.raises(KeyError, match="not a LlamaGen VQ state_dict"):
        convert_llamagen_vq({"foo": torch.zeros(1)})


def test_cli_pt_and_safetensors_round_trip(ref, tmp_path):
    t, sd = ref
    pt = tmp_path / "vq.pt"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "steps": 7}, pt)  # DDP-prefixed, like training
    assert main([str(pt), str(tmp_path / "out"), "image_size=32"]) == 0
    tok = MGVQTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.config.image_size == 32
    _check(tok, t)
    st = tmp_path / "vq.safetensors"
    save_file(sd, st)
    assert load_checkpoint_state_dict(str(st)).keys() == sd.keys()
    ema = tmp_path / "ema.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "ema": sd}, ema)
    assert load_checkpoint_state_dict(str(ema), key="ema").keys() == sd.keys()
    with pytest.raises(KeyError, match="no 'emma' entry"):
        load_checkpoint_state_dict(str(ema), key="emma")
