"""`mgvq convert --from llamagen-gpt` reads every size the weights fix, including the SwiGLU width of a GPT built
with another multiple_of / ffn_dim_multiplier (LlamaGen's key layout is GPT's, G=1, parallel head)."""
from __future__ import annotations

import pytest
import torch

from generator import GPT
from generator.convert import convert_llamagen_gpt, convert_mgvq_gpt, main


def _llamagen_layout_gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    m = GPT.from_preset("GPT-tiny", dim=128, n_head=4, n_layer=2, groups=1, codebook_size=64, num_classes=10,
                        grid=4, head="parallel", **kw)
    torch.nn.init.normal_(m.output.weight, std=0.2)  # zero-initialised head -> logits that depend on the input
    return m.eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(64, (3, 16, 1), generator=g), torch.tensor([0, 4, 9])


@pytest.mark.parametrize("kw,hidden", [(dict(multiple_of=32), 352), (dict(multiple_of=1000), 1000),
                                       (dict(ffn_dim_multiplier=0.5, multiple_of=16), 176)])
def test_other_multiple_of_converts_with_equal_logits(tmp_path, kw, hidden):
    src = _llamagen_layout_gpt(**kw)
    assert src.config.ffn_hidden == hidden and GPT.from_preset("GPT-tiny", dim=128, n_head=4).config.ffn_hidden == 512
    ckpt = {"model": {k: v.clone() for k, v in src.state_dict().items()}, "steps": 7}  # LlamaGen's checkpoint dict
    pt = tmp_path / "c2i_custom.pt"
    torch.save(ckpt, pt)
    assert main(["--from", "llamagen-gpt", str(pt), str(tmp_path / "out"), "n_head=4", "grid=4"]) == 0
    got = GPT.from_pretrained(str(tmp_path / "out")).eval()
    assert got.config.ffn_hidden == hidden
    assert got.layers[0].feed_forward.w1.weight.shape == (hidden, 128)
    codes, labels = _inputs()
    torch.testing.assert_close(got(codes, labels), src(codes, labels), rtol=0, atol=0)


def test_default_width_keeps_llamagen_defaults():
    m = convert_llamagen_gpt({"model": _llamagen_layout_gpt().state_dict()}, dict(n_head=4, grid=4))
    assert (m.config.multiple_of, m.config.ffn_dim_multiplier) == (256, None)


def test_explicit_width_overrides_must_match_the_weights():
    sd = _llamagen_layout_gpt(multiple_of=32).state_dict()
    assert convert_llamagen_gpt(sd, dict(n_head=4, grid=4, multiple_of=32)).config.ffn_hidden == 352
    with pytest.raises(ValueError, match=r"multiple_of=256, ffn_dim_multiplier=None give a SwiGLU width of 512, but "
                                         r"the weights have 352"):
        convert_llamagen_gpt(sd, dict(n_head=4, grid=4, multiple_of=256))
    bad = dict(sd)
    bad["layers.1.feed_forward.w1.weight"] = torch.zeros(384, 128)
    with pytest.raises(ValueError, match=r"different SwiGLU widths \[352, 384\]"):
        convert_llamagen_gpt(bad, dict(n_head=4, grid=4))


def test_mgvq_gpt_with_another_multiple_of_and_a_foreign_ar_head():
    torch.manual_seed(0)
    cb = torch.randn(4 * 32, 8)
    src = GPT.from_preset("GPT-tiny", dim=64, n_head=4, groups=4, codebook_size=32, grid=4, num_classes=10,
                          input_mode="projector", head="ar", multiple_of=64, codebook=cb).eval()
    assert src.config.ffn_hidden == 192
    got = convert_mgvq_gpt({"model": src.state_dict()}, cb, dict(n_head=4)).eval()
    assert got.config.ffn_hidden == 192
    codes, labels = torch.randint(32, (2, 16, 4)), torch.tensor([1, 2])
    torch.testing.assert_close(got(codes, labels), src(codes, labels), rtol=0, atol=0)
    sd = dict(src.state_dict())
    sd["ar_head.causal_space_blocks.0.feed_forward.w1.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"AR-head SwiGLU width 4\*D = \(256, 64\)"):
        convert_mgvq_gpt(sd, cb, dict(n_head=4))
