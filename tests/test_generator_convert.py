"""Converters vs numeric fixtures produced by the original LlamaGen / MGVQ code (see the fixtures' JSON)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator import GPT, generate
from generator.convert import convert_llamagen_gpt, convert_mgvq_gpt, main, unwrap_state_dict

from _paths import FIXTURES

FIX = str(FIXTURES)
TOL = dict(atol=1e-4, rtol=1e-4)


def fixture(name):
    t = load_file(f"{FIX}/{name}.safetensors")
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    return t, sd


def test_llamagen_gpt_fixture():
    t, sd = fixture("llamagen_gpt")  # dim 64 is no LlamaGen width: n_head and grid come from the JSON constructor
    m = convert_llamagen_gpt({"model": sd}, dict(n_head=4, grid=4)).eval()
    c = m.config
    assert (c.dim, c.n_layer, c.codebook_size, c.num_classes, c.groups, c.head) == (64, 2, 128, 10, 1, "parallel")
    torch.testing.assert_close(m.freqs_cis, t["freqs_cis"], rtol=0, atol=0)
    logits = m(t["idx"][..., None], t["cond_idx"])  # (B, L, 1, K)
    torch.testing.assert_close(logits[:, :, 0], t["logits"], **TOL)
    loss = m.compute_loss(t["idx"][..., None], t["cond_idx"])["loss"]
    torch.testing.assert_close(loss, t["loss"][0], **TOL)
    for s, name in [(2.0, "cfg2"), (1.0, "cfg1")]:
        codes, seen = generate(m, t["gen_labels"], guidance_scale=s, top_k=1, return_logits=True)
        assert torch.equal(codes.view(2, -1), t[f"gen_{name}_tokens"])
        torch.testing.assert_close(seen.view(2, 16, -1), t[f"gen_{name}_step_logits"], **TOL)


def test_mgvq_gpt_fixture():
    t, sd = fixture("mgvq_gpt")
    tok = load_file(f"{FIX}/mgvq_tokenizer.safetensors")
    torch.testing.assert_close(tok["state_dict.quantize.embedding.weight"], t["embs"], rtol=0, atol=0)
    m = convert_mgvq_gpt(sd, t["embs"], dict(n_head=4)).eval()
    c = m.config
    assert (c.groups, c.codebook_size, c.codebook_embed_dim, c.grid, c.head, c.input_mode) == \
        (4, 32, 32, 4, "ar", "projector")
    assert not any("adaLN" in k for k in m.state_dict())
    torch.testing.assert_close(m.freqs_cis, t["freqs_cis"], rtol=0, atol=0)
    # AR head teacher forcing (reference returns G+1 positions; position 0 is unused)
    torch.testing.assert_close(m.ar_head(t["feature"][:, 0], t["gt_index"]), t["ar_head_logits"][:, 1:], **TOL)
    for s, name in [(2.0, "cfg2"), (1.0, "cfg1")]:
        codes, seen = generate(m, t["gen_labels"], guidance_scale=s, top_k=1, return_logits=True)
        assert torch.equal(codes.view(2, 16, 4), t[f"gen_{name}_tokens"])
        torch.testing.assert_close(seen.view(2, 16, 4, -1), t[f"gen_{name}_step_logits"], **TOL)
        # backbone features (after the final RMSNorm) for [cond; uncond] from a teacher-forced pass
        codes, labels = codes.view(2, 16, 4), t["gen_labels"]
        if s != 1.0:
            codes, labels = torch.cat([codes, codes]), torch.cat([labels, torch.full_like(labels, 10)])
        torch.testing.assert_close(m.backbone_features(codes, labels), t[f"gen_{name}_backbone_h"], **TOL)


def test_unwrap_handles_wrappers_and_prefixes():
    sd = {"a.weight": torch.ones(2), "freqs_cis": torch.zeros(3)}
    for ck in (sd, {"model": sd}, {"module": sd}, {"state_dict": sd, "steps": 3},
               {"model": {"module._orig_mod.a.weight": torch.ones(2)}}):
        assert list(unwrap_state_dict(ck)) == ["a.weight"]
    with pytest.raises(ValueError, match="no tensors"):
        unwrap_state_dict({"args": 1})


def test_cli_llamagen_pt_and_mgvq_tokenizer_dir(tmp_path):
    t, sd = fixture("llamagen_gpt")
    pt = tmp_path / "c2i_tiny.pt"
    torch.save({"model": sd, "steps": 10}, pt)
    assert main(["--from", "llamagen-gpt", str(pt), str(tmp_path / "lg"), "n_head=4", "grid=4"]) == 0
    m = GPT.from_pretrained(str(tmp_path / "lg")).eval()
    torch.testing.assert_close(m(t["idx"][..., None], t["cond_idx"])[:, :, 0], t["logits"], **TOL)

    t, sd = fixture("mgvq_gpt")
    tok_dir = tmp_path / "tok"  # tokenizer-folder contract: model.safetensors quantize.embedding.weight + groups
    tok_dir.mkdir()
    save_file({"quantize.embedding.weight": t["embs"], "encoder.x": torch.zeros(1)}, str(tok_dir / "model.safetensors"))
    (tok_dir / "config.json").write_text(json.dumps({"groups": 4, "codebook_size": 32}))
    pt = tmp_path / "MGVQ_GPT.pt"
    torch.save({"model": sd}, pt)
    assert main(["--from", "mgvq-gpt", str(pt), str(tmp_path / "mg"), "--tokenizer", str(tok_dir), "n_head=4"]) == 0
    m = GPT.from_pretrained(str(tmp_path / "mg")).eval()
    torch.testing.assert_close(m.codebook, t["embs"], rtol=0, atol=0)
    codes = generate(m, t["gen_labels"], guidance_scale=2.0, top_k=1)
    assert torch.equal(codes.view(2, 16, 4), t["gen_cfg2_tokens"])
    # --codebook FILE form and a mismatching tokenizer config fail loudly / work
    save_file({"codebook": t["embs"]}, str(tmp_path / "cb.safetensors"))
    assert main(["--from", "mgvq-gpt", str(pt), str(tmp_path / "mg2"), "--codebook", str(tmp_path / "cb.safetensors"),
                 "n_head=4"]) == 0
    (tok_dir / "config.json").write_text(json.dumps({"groups": 8}))
    with pytest.raises(ValueError, match="groups=8"):
        main(["--from", "mgvq-gpt", str(pt), str(tmp_path / "mg3"), "--tokenizer", str(tok_dir), "n_head=4"])
    with pytest.raises(ValueError, match="grid"):
        convert_llamagen_gpt(fixture("llamagen_gpt")[1], dict(n_head=4))
