"""Text-conditional GPT (LlamaGen t2i layout): converter vs LlamaGen's own t2i fixture, cached decoding vs full
forward, CFG with the null caption under the caption's padding mask, left padding."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from generator import GPT, generate
from generator.convert import convert_llamagen_gpt_t2i, main

from _paths import FIXTURES

FIX = str(FIXTURES)
TOL = dict(atol=1e-4, rtol=1e-4)


def fixture():
    t = load_file(f"{FIX}/llamagen_gpt_t2i.safetensors")
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    return t, sd


def tiny_text(G=1, head="parallel", input_mode="sum", **kw):
    torch.manual_seed(0)
    extra = {}
    if input_mode == "projector":
        extra = dict(codebook=torch.randn(G * 16, 4), codebook_embed_dim=4 * G)
    m = GPT.from_preset("GPT-tiny", grid=3, groups=G, codebook_size=16, head=head, input_mode=input_mode,
                        conditioning="text", caption_dim=12, caption_tokens=5, token_dropout_p=0.0,
                        resid_dropout_p=0.0, ffn_dropout_p=0.0, **extra, **kw)
    if head == "parallel":
        torch.nn.init.normal_(m.output.weight, std=0.3)
    return m.eval()


def captions(B=3, T=5, C=12, lengths=(5, 2, 1)):
    torch.manual_seed(1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True
    return torch.randn(B, T, C) * mask[..., None], mask


def test_llamagen_t2i_fixture_logits_loss_and_generation():
    t, sd = fixture()
    m = convert_llamagen_gpt_t2i({"model": sd}, dict(n_head=4, grid=4)).eval()
    c = m.config
    assert (c.conditioning, c.dim, c.n_layer, c.caption_dim, c.caption_tokens, c.codebook_size, c.groups) == \
        ("text", 128, 3, 32, 8, 256, 1)
    assert c.ffn_hidden == 512
    torch.testing.assert_close(m.freqs_cis, t["freqs_cis"], rtol=0, atol=0)  # 8 zero caption rows + 4 x 4 grid
    torch.testing.assert_close(m.caption_attn_mask(t["emb_masks"].bool(), 24), t["attn_mask"], rtol=0, atol=0)
    idx, cond, mask = t["idx"][..., None], t["cond"], t["emb_masks"]
    logits = m(idx, cond, cond_mask=mask)  # (B, L, 1, K)
    torch.testing.assert_close(logits[:, :, 0], t["logits"], **TOL)
    torch.testing.assert_close(m.compute_loss(idx, cond, cond_mask=mask)["loss"], t["loss"][0], **TOL)
    # values in the padded rows change nothing
    noisy = cond + torch.randn_like(cond) * (~mask.bool())[..., None]
    torch.testing.assert_close(m(idx, noisy, cond_mask=mask), logits, rtol=0, atol=0)
    for s, name in [(2.0, "cfg2"), (1.0, "cfg1")]:
        codes, seen = generate(m, cond, cond_mask=mask, guidance_scale=s, top_k=1, return_logits=True)
        assert codes.shape == (3, 4, 4, 1)
        assert torch.equal(codes.view(3, -1), t[f"gen_{name}_tokens"])
        torch.testing.assert_close(seen.view(3, 16, -1), t[f"gen_{name}_step_logits"], **TOL)


def test_convert_cli_llamagen_t2i_then_from_pretrained(tmp_path):
    t, sd = fixture()
    ckpt = tmp_path / "t2i_tiny.safetensors"
    save_file(sd, str(ckpt))
    out = tmp_path / "gpt"
    assert main(["--from", "llamagen-gpt-t2i", str(ckpt), str(out), "n_head=4", "grid=4"]) == 0
    m = GPT.from_pretrained(str(out)).eval()
    assert m.config.conditioning == "text" and m.config.caption_tokens == 8
    logits = m(t["idx"][..., None], t["cond"], cond_mask=t["emb_masks"])
    torch.testing.assert_close(logits[:, :, 0], t["logits"], **TOL)
    with pytest.raises(ValueError, match="grid"):
        convert_llamagen_gpt_t2i(sd, dict(n_head=4))
    with pytest.raises(ValueError, match="caption_tokens=8"):
        convert_llamagen_gpt_t2i(sd, dict(n_head=4, grid=4, caption_tokens=120))
    from generator.convert import convert_llamagen_gpt
    with pytest.raises(ValueError, match="cls_embedding"):
        convert_llamagen_gpt(sd, dict(n_head=4, grid=4))


@pytest.mark.parametrize("G,head,mode", [(1, "parallel", "sum"), (2, "ar", "projector")])
def test_t2i_cached_decoding_equals_full_forward(G, head, mode):
    m = tiny_text(G, head, mode)
    feats, mask = captions()
    for s in (1.0, 3.0):
        codes, seen = generate(m, feats, cond_mask=mask, guidance_scale=s, top_k=1, return_logits=True)
        full = m(codes, feats, cond_mask=mask)  # (B, L, G, K)
        if s != 1.0:  # the uncond half: null caption with the SAME mask
            unc = m(codes, m.null_caption(3), cond_mask=mask)
            full = unc + s * (full - unc)
        torch.testing.assert_close(seen.flatten(1, 2), full, atol=1e-4, rtol=1e-4)
        assert torch.equal(full.argmax(-1), codes.flatten(1, 2))


def test_t2i_cfg_uses_null_caption_with_the_same_mask_and_negative_captions():
    m = tiny_text()
    feats, mask = captions()
    _, seen = generate(m, feats, cond_mask=mask, guidance_scale=2.0, top_k=1, return_logits=True)
    # an explicit negative caption equal to the null caption under the same mask gives the same logits
    _, same = generate(m, feats, cond_mask=mask, guidance_scale=2.0, top_k=1, return_logits=True,
                       negative_cond=m.null_caption(3).clone(), negative_cond_mask=mask)
    torch.testing.assert_close(same, seen, rtol=0, atol=1e-6)
    # the null caption under an all-ones mask is a different uncond (LlamaGen does not do this)
    _, ones = generate(m, feats, cond_mask=mask, guidance_scale=2.0, top_k=1, return_logits=True,
                       negative_cond=m.null_caption(3).clone())
    assert (ones[1:] - seen[1:]).abs().max() > 1e-3
    torch.testing.assert_close(ones[0], seen[0], rtol=0, atol=1e-6)  # row 0 is a full-length caption
    # a real negative caption changes the guided logits
    neg, nmask = captions(lengths=(3, 3, 3))
    _, negd = generate(m, feats, cond_mask=mask, guidance_scale=2.0, top_k=1, return_logits=True,
                       negative_cond=neg, negative_cond_mask=nmask)
    assert (negd - seen).abs().max() > 1e-3


def test_t2i_left_padding_and_errors():
    m = tiny_text()
    feats, mask = captions()
    codes = torch.randint(0, 16, (3, 3, 3, 1))
    full = m(codes, feats, cond_mask=mask)
    # a shorter caption tensor is left-padded to caption_tokens: rows 1, 2 (lengths 2, 1) are unchanged
    torch.testing.assert_close(m(codes[1:], feats[1:, 3:], cond_mask=mask[1:, 3:]), full[1:], atol=1e-5, rtol=0)
    # padded rows' values do not matter; no mask = every caption row is read
    torch.testing.assert_close(m(codes, feats + 5 * (~mask)[..., None], cond_mask=mask), full, rtol=0, atol=0)
    assert (m(codes, feats + 5 * (~mask)[..., None]) - full)[1:].abs().max() > 1e-3
    with pytest.raises(ValueError, match="left-padded"):
        m(codes, feats, cond_mask=mask.flip(1))
    with pytest.raises(ValueError, match="caption_dim=12"):
        m(codes, torch.randn(3, 5, 7))
    with pytest.raises(ValueError, match="caption_tokens=5"):
        m(codes, torch.randn(3, 6, 12))
    with pytest.raises(ValueError, match="caption features"):
        generate(m, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="conditioning"):
        GPT.from_preset("GPT-tiny", conditioning="image")


def test_t2i_caption_dropout_replaces_with_the_null_caption_in_training():
    m = tiny_text(class_dropout_prob=0.999)
    m.train()
    feats, mask = captions()
    codes = torch.randint(0, 16, (3, 3, 3, 1))
    torch.manual_seed(0)
    dropped = m(codes, feats, cond_mask=mask)
    m.eval()
    torch.testing.assert_close(dropped, m(codes, m.null_caption(3), cond_mask=mask), atol=1e-5, rtol=0)
    loss = m.train().compute_loss(codes, feats, cond_mask=mask)["loss"]
    loss.backward()
    assert m.cls_embedding.cap_proj.fc1.weight.grad is not None
    assert "cls_embedding.uncond_embedding" in m.state_dict()
    assert not any(n.endswith("uncond_embedding") for n, _ in m.named_parameters())


def test_t2i_compiled_decode_step_matches_eager():
    m = tiny_text()
    feats, mask = captions()
    a, la = generate(m, feats, cond_mask=mask, guidance_scale=2.0, top_k=1, return_logits=True)
    b, lb = generate(m, feats, cond_mask=mask, guidance_scale=2.0, top_k=1, return_logits=True, compile=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
