import pytest
import torch

from generator import GPT, GPTConfig
from generator.model import precompute_freqs_cis_2d


def tiny(**kw):
    args = dict(groups=4, codebook_size=32, grid=4, num_classes=10, token_dropout_p=0.0, resid_dropout_p=0.0,
                ffn_dropout_p=0.0)
    args.update(kw)
    cb = kw.pop("codebook", None)
    if args.get("input_mode") == "projector" and cb is None:
        args["codebook"] = torch.randn(args["groups"] * args["codebook_size"], 8)
        args["codebook_embed_dim"] = 8 * args["groups"]
    torch.manual_seed(0)
    m = GPT.from_preset("GPT-tiny", **args)
    if m.config.head == "parallel":  # zero-init output would make every logit 0
        torch.nn.init.normal_(m.output.weight, std=0.1)
    return m


@pytest.mark.parametrize("name,count", [("GPT-B", 110_888_448), ("GPT-L", 342_910_976), ("GPT-XL", 774_699_520),
                                        ("GPT-XXL", 1_410_972_672), ("GPT-3B", 3_096_659_200)])
def test_llamagen_parameter_counts_on_meta(name, count):
    with torch.device("meta"):
        m = GPT.from_preset(name, groups=1, codebook_size=16384)
    assert m.num_parameters() == count  # 110.9M / 342.9M / 774.7M / 1411.0M / 3096.7M (LlamaGen, 1001 class rows)
    assert m.cls_embedding.embedding_table.weight.shape[0] == 1001


def test_mgvq_xxl_parameter_count_on_meta():
    # reference 1548.3M total / 186.5M AR head include 84.9M of unused adaLN_modulation that we do not build
    with torch.device("meta"):
        m = GPT.from_preset("GPT-XXL", groups=4, codebook_size=8192, grid=24, input_mode="projector",
                            codebook_embed_dim=32, head="ar")
    assert round(m.num_parameters() / 1e6, 1) == round(1548.3 - 84.9, 1)
    assert round(sum(p.numel() for p in m.ar_head.parameters()) / 1e6, 1) == round(186.5 - 84.9, 1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="head"):
        GPTConfig(head="mlp")
    with pytest.raises(ValueError, match="input_mode"):
        GPTConfig(input_mode="concat")
    with pytest.raises(ValueError, match="head_dim"):
        GPTConfig(dim=60, n_head=6)
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({"dim": 64, "n_layers": 2})
    with pytest.raises(ValueError, match="codebook"):
        GPT(GPTConfig(dim=64, n_layer=1, n_head=4, groups=2, codebook_size=8, input_mode="projector",
                      codebook_embed_dim=8, grid=2), codebook=torch.randn(10, 4))
    m = tiny()
    with pytest.raises(ValueError, match="G=4"):
        m(torch.zeros(1, 16, 3, dtype=torch.long), torch.tensor([0]))


def test_rope_table_class_rows_zero_and_values():
    f = precompute_freqs_cis_2d(grid=3, head_dim=8)  # (1 + 9, 4, 2)
    assert f.shape == (10, 4, 2)
    assert torch.all(f[0] == 0)  # class token: cos = sin = 0
    # position (i=1, j=2) -> row 1 + 1*3 + 2; pairs 0,1 rotate by i*f_k, pairs 2,3 by j*f_k, f = [1, 0.01]
    ang = torch.tensor([1 * 1.0, 1 * 0.01, 2 * 1.0, 2 * 0.01])
    torch.testing.assert_close(f[1 + 5, :, 0], ang.cos())
    torch.testing.assert_close(f[1 + 5, :, 1], ang.sin())


@pytest.mark.parametrize("head,mode", [("parallel", "sum"), ("ar", "projector"), ("ar", "sum")])
def test_teacher_forcing_is_causal(head, mode):
    m = tiny(head=head, input_mode=mode).eval()
    codes = torch.randint(0, 32, (2, 4, 4, 4))
    lab = torch.tensor([1, 7])
    lg = m(codes, lab)
    assert lg.shape == (2, 16, 4, 32) and lg.dtype == torch.float32
    c2 = codes.flatten(1, 2).clone()
    c2[:, 5, 1] = (c2[:, 5, 1] + 1) % 32  # change sub-token 1 of position 5
    lg2 = m(c2, lab)
    torch.testing.assert_close(lg2[:, :5], lg[:, :5], rtol=0, atol=0)  # earlier positions unaffected
    assert (lg2[:, 6:] - lg[:, 6:]).abs().max() > 1e-4  # later positions see it
    if head == "ar":  # within position 5: sub-tokens 0,1 unaffected, 2,3 conditioned on sub-token 1
        torch.testing.assert_close(lg2[:, 5, :2], lg[:, 5, :2], rtol=0, atol=0)
        assert (lg2[:, 5, 2:] - lg[:, 5, 2:]).abs().max() > 1e-4
    else:
        torch.testing.assert_close(lg2[:, 5], lg[:, 5], rtol=0, atol=0)
    # class label matters
    assert (m(codes, torch.tensor([2, 7]))[0] - lg[0]).abs().max() > 1e-4


def test_compute_loss_zero_init_head_is_log_k_and_backprops():
    torch.manual_seed(0)
    m = GPT.from_preset("GPT-tiny", groups=2, codebook_size=64, grid=4, num_classes=10)
    codes = torch.randint(0, 64, (3, 16, 2), dtype=torch.int16)  # int16 codes from the shards are fine
    out = m.compute_loss(codes, torch.tensor([0, 1, 2]))
    assert out["group_losses"].shape == (2,)
    torch.testing.assert_close(out["loss"], torch.log(torch.tensor(64.0)))
    out["loss"].backward()
    assert m.output.weight.grad.abs().sum() > 0


def test_label_dropout_only_in_training():
    m = tiny(class_dropout_prob=0.5)
    lab = torch.zeros(4000, dtype=torch.long)
    null = m.cls_embedding.embedding_table.weight[10]
    m.train()
    torch.manual_seed(1)
    e = m.embed_class(lab)[:, 0]
    frac = (e == null).all(-1).float().mean().item()
    assert 0.45 < frac < 0.55
    m.eval()
    assert not (m.embed_class(lab)[:, 0] == null).all(-1).any()


def test_gradient_checkpointing_same_grads():
    codes = torch.randint(0, 32, (2, 16, 4))
    lab = torch.tensor([1, 2])
    grads = []
    for gc in (False, True):
        m = tiny(head="ar", grad_checkpointing=gc).train()
        m.compute_loss(codes, lab)["loss"].backward()
        grads.append(m.layers[0].attention.wqkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_save_load_roundtrip_projector_codebook_frozen(tmp_path):
    m = tiny(head="ar", input_mode="projector").eval()
    assert "codebook" in m.state_dict() and "codebook" not in dict(m.named_parameters())
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    m2 = GPT.from_pretrained(str(tmp_path)).eval()
    assert m2.config == m.config
    torch.testing.assert_close(m2.codebook, m.codebook, rtol=0, atol=0)
    codes = torch.randint(0, 32, (2, 16, 4))
    lab = torch.tensor([3, 4])
    torch.testing.assert_close(m2(codes, lab), m(codes, lab), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the frozen tokenizer codebook"):
        GPT(m.config)


def test_bf16_keeps_fp32_rope_and_runs():
    m = tiny(head="ar", input_mode="projector").eval()
    ref = m.freqs_cis.clone()
    m = m.to(torch.bfloat16)
    assert m.freqs_cis.dtype == torch.float32 and torch.equal(m.freqs_cis, ref)
    assert m.codebook.dtype == torch.bfloat16  # the reference casts the codebook to the GPT precision
    codes = torch.randint(0, 32, (1, 16, 4))
    assert m(codes, torch.tensor([1])).dtype == torch.float32
