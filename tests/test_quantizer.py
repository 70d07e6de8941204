import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizer import MultiGroupQuantizer, default_keep_probs


def _brute_force(z, weight, G, K, l2_norm):
    """z (B, C, h, w), weight (G*K, D) -> (B, h, w, G) nearest codes by explicit per-vector loops over groups."""
    B, C, h, w = z.shape
    D = C // G
    zf = z.permute(0, 2, 3, 1).reshape(-1, C)
    out = []
    for g in range(G):
        zg = zf[:, g * D:(g + 1) * D]
        e = weight[g * K:(g + 1) * K]
        if l2_norm:
            zg, e = F.normalize(zg, dim=-1), F.normalize(e, dim=-1)
        out.append(torch.cdist(zg.double(), e.double()).argmin(-1))
    return torch.stack(out, -1).reshape(B, h, w, G)


@pytest.mark.parametrize("G,l2_norm", [(1, True), (2, True), (4, True), (8, True), (4, False)])
def test_indices_are_true_nearest_codes(G, l2_norm):
    torch.manual_seed(G)
    K, C = 64, 32
    q = MultiGroupQuantizer(C, G, K, l2_norm=l2_norm).eval()
    q.embedding.weight.data = torch.randn_like(q.embedding.weight)  # distinct, not unit-norm codes
    z = torch.randn(3, C, 5, 7)
    ref = _brute_force(z, q.embedding.weight.data, G, K, l2_norm)
    idx = q.encode_indices(z)
    assert idx.dtype == torch.int64 and idx.shape == (3, 5, 7, G)
    assert torch.equal(idx, ref)
    out = q(z)
    assert torch.equal(out.indices, ref)
    # the quantized latent is exactly the looked-up codes
    torch.testing.assert_close(out.z_q, q.lookup(ref), atol=1e-6, rtol=0)
    if l2_norm:  # every sub-vector of z_q has unit norm
        norms = out.z_q.permute(0, 2, 3, 1).reshape(-1, G, C // G).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_storage_and_init_match_released_layout():
    G, K, C = 4, 16, 32
    q = MultiGroupQuantizer(C, G, K)
    assert q.embedding.weight.shape == (G * K, C // G)
    torch.testing.assert_close(q.embedding.weight.norm(dim=-1), torch.ones(G * K))
    assert q.codebook().shape == (G, K, C // G)
    assert torch.equal(q.codebook()[2, 5], q.embedding.weight[2 * K + 5])  # group g owns rows [g*K, (g+1)*K)
    assert q.embed_prob.shape == (G, K) and q.codebook_used.shape == (G, 65536)
    assert (q.codebook_used == -1).all()


def test_straight_through_gradient_and_losses():
    torch.manual_seed(0)
    G, K, C, beta = 4, 32, 16, 0.25
    q = MultiGroupQuantizer(C, G, K, beta=beta).train()
    q.embedding.weight.data = torch.randn_like(q.embedding.weight)
    z = torch.randn(2, C, 3, 3, requires_grad=True)
    r = torch.randn(2, C, 3, 3)
    out = q(z, keep_groups=G)
    (out.z_q * r).sum().backward()
    # STE: d z_q / d z == d normalize_per_group(z) / d z
    z2 = z.detach().clone().requires_grad_(True)
    zn = F.normalize(z2.view(2, G, C // G, 3, 3), dim=2).view(2, C, 3, 3)
    (zn * r).sum().backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, z2.grad)

    # losses by hand, per group, on the normalised vectors
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, G, C // G)
    codes = F.normalize(q.embedding.weight.detach().view(G, K, -1), dim=-1)
    for g in range(G):
        zg = F.normalize(zf[:, g], dim=-1)
        e = codes[g][out.indices[..., g].reshape(-1)]
        mse = ((e - zg) ** 2).mean()
        assert out.vq_loss[g].item() == pytest.approx(mse.item(), rel=1e-5)
        assert out.commit_loss[g].item() == pytest.approx(beta * mse.item(), rel=1e-5)
    # vq loss trains the codebook only, commit the encoder only
    q.zero_grad()
    z.grad = None
    out = q(z, keep_groups=G)
    out.vq_loss.sum().backward()
    assert z.grad is None or z.grad.abs().sum() == 0
    assert q.embedding.weight.grad.abs().sum() > 0
    q.zero_grad()
    out = q(z, keep_groups=G)
    out.commit_loss.sum().backward()
    assert q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0
    assert z.grad.abs().sum() > 0


def test_default_keep_probs():
    assert default_keep_probs(1) == [1.0]
    assert default_keep_probs(2) == [0.2, 0.8]
    assert default_keep_probs(4) == pytest.approx([0.2, 0.1, 0.1, 0.6])
    p8 = default_keep_probs(8)
    assert p8[0] == 0.2 and p8[-1] == 0.6 and sum(p8) == pytest.approx(1.0)
    assert p8[1:-1] == pytest.approx([0.2 / 6] * 6)


def test_nested_masking_frequencies_match_schedule():
    torch.manual_seed(0)
    q = MultiGroupQuantizer(32, 4, 8, keep_probs=default_keep_probs(4)).train()
    n = 10000
    ks = torch.tensor([q.sample_keep_groups() for _ in range(n)])
    freq = torch.bincount(ks, minlength=5)[1:].float() / n
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.1, 0.1, 0.6]), atol=0.02, rtol=0)
    # forward draws ONE k per batch from the same schedule
    z = torch.randn(2, 32, 2, 2)
    ks = torch.tensor([q(z).keep_groups for _ in range(400)])
    freq = torch.bincount(ks, minlength=5)[1:].float() / len(ks)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.1, 0.1, 0.6]), atol=0.08, rtol=0)
    # no masking in eval, without a schedule, or with G = 1
    assert q.eval()(z).keep_groups == 4
    assert MultiGroupQuantizer(32, 4, 8).train()(z).keep_groups == 4
    assert MultiGroupQuantizer(32, 1, 8, keep_probs=[1.0]).train()(z).keep_groups == 1


def test_masked_groups_get_no_loss_no_index_and_zero_latent():
    torch.manual_seed(0)
    G, K, C = 4, 16, 32
    q = MultiGroupQuantizer(C, G, K).train()
    q.embedding.weight.data = torch.randn_like(q.embedding.weight)
    z = torch.randn(2, C, 4, 4, requires_grad=True)
    full = q.encode_indices(z)
    out = q(z, keep_groups=2)
    assert out.keep_groups == 2 and out.indices.shape == (2, 4, 4, 2)
    assert torch.equal(out.indices, full[..., :2])
    assert (out.vq_loss[2:] == 0).all() and (out.commit_loss[2:] == 0).all()
    assert (out.vq_loss[:2] > 0).all() and (out.commit_loss[:2] > 0).all()
    assert (out.perplexity[2:] == 0).all() and (out.perplexity[:2] > 1).all()
    assert (out.z_q[:, 16:] == 0).all()
    torch.testing.assert_close(out.z_q[:, :16], q.lookup(full)[:, :16])
    # no gradient reaches the masked channels of the latent
    (out.z_q.sum() + out.commit_loss.sum()).backward()
    assert (z.grad[:, 16:] == 0).all() and z.grad[:, :16].abs().sum() > 0
    # usage window only records the kept groups
    assert (q.codebook_used[:2, :32] >= 0).all() and (q.codebook_used[:2, 32:] == -1).all()
    assert (q.codebook_used[2:] == -1).all()


def test_lookup_groups_to_use():
    torch.manual_seed(0)
    G, K, C = 4, 16, 32
    q = MultiGroupQuantizer(C, G, K)
    idx = torch.randint(0, K, (2, 3, 3, G))
    full = q.lookup(idx)
    codes = F.normalize(q.codebook().detach(), dim=-1)
    for g in range(G):
        torch.testing.assert_close(full[:, g * 8:(g + 1) * 8].permute(0, 2, 3, 1), codes[g][idx[..., g]])
    for k in range(1, G + 1):
        part = q.lookup(idx, groups_to_use=k)
        assert torch.equal(part[:, :k * 8], full[:, :k * 8]) and (part[:, k * 8:] == 0).all()
    assert torch.equal(q.lookup(idx[..., :2]), q.lookup(idx, groups_to_use=2))  # fewer columns = fewer groups
    with pytest.raises(ValueError, match="groups_to_use"):
        q.lookup(idx, groups_to_use=0)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\)"):
        q.lookup(idx + K)


def test_usage_window_and_perplexity():
    G, K = 2, 8
    q = MultiGroupQuantizer(4, G, K, usage_window=6).train()
    # group 0 codes point along +e0.., group 1 likewise: choose z to hit known codes
    w = torch.zeros(G * K, 2)
    ang = torch.arange(K) * (2 * torch.pi / K)
    w[:K] = torch.stack([ang.cos(), ang.sin()], -1)
    w[K:] = w[:K]
    q.embedding.weight.data = w
    targets0 = torch.tensor([0, 1, 2, 3])
    targets1 = torch.tensor([5, 5, 5, 5])
    z = torch.cat([w[targets0], w[K + targets1]], -1).view(1, 2, 2, 4).permute(0, 3, 1, 2)
    out = q(z, keep_groups=G)
    assert torch.equal(out.indices[0, ..., 0].reshape(-1), targets0)
    torch.testing.assert_close(out.perplexity, torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(out.usage, torch.tensor([4 / K, 1 / K]))
    assert q.codebook_used[0].tolist() == [0, 1, 2, 3, -1, -1]
    q(z * torch.tensor([1.0, 1, -1, -1]).view(1, 4, 1, 1), keep_groups=G)  # group 1 -> the opposite code 1
    assert q.codebook_used[0].tolist() == [2, 3, 2, 3, 0, 1]  # ring buffer of 6: oldest entries overwritten
    assert q.codebook_used[1].tolist() == [1, 1, 5, 5, 1, 1]
    torch.testing.assert_close(q.usage(), torch.tensor([4 / K, 2 / K]))


def test_dead_code_reinit_moves_unused_codes_to_features():
    torch.manual_seed(0)
    G, K, C = 2, 16, 8
    q = MultiGroupQuantizer(C, G, K, dead_code_reinit=True).train()
    w0 = F.normalize(torch.randn(G * K, C // G), dim=-1)
    w0[1:K] = -w0[0]  # all codes of group 0 except code 0 point away from the data
    w0[K + 1:] = -w0[K]
    q.embedding.weight.data = w0.clone()
    z = torch.cat([w0[0], w0[K]]).view(1, C, 1, 1).repeat(2, 1, 3, 3) + 0.01 * torch.randn(2, C, 3, 3)
    out = q(z, keep_groups=G)
    assert (out.indices[..., 0] == 0).all() and (out.indices[..., 1] == 0).all()
    # EMA of usage: code 0 got every feature
    torch.testing.assert_close(q.embed_prob[:, 0], torch.full((G,), 0.01))
    assert (q.embed_prob[:, 1:] == 0).all()
    w = q.embedding.weight.detach().view(G, K, -1)
    # the used code barely moved (keep = 1 - exp(-1000 * 0.01 * 10 ... )), dead codes became batch features
    torch.testing.assert_close(w[:, 0], w0.view(G, K, -1)[:, 0], atol=1e-6, rtol=0)
    feats = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, G, C // G), dim=-1)  # (N, G, D)
    for g in range(G):
        d = torch.cdist(w[g, 1:], feats[:, g]).min(-1).values  # each dead code sits (0.1% away) on a feature
        assert d.max() < 0.01
    # gradients still flow after the in-place re-init
    (out.vq_loss.sum() + out.commit_loss.sum()).backward()
    assert q.embedding.weight.grad is not None


def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same init on every rank
    q = MultiGroupQuantizer(8, 2, 32, dead_code_reinit=True, keep_probs=[0.5, 0.5]).train()
    torch.manual_seed(100 + rank)  # different data and RNG per rank
    usage, ks = [], []
    for _ in range(6):
        out = q(torch.randn(2, 8, 4, 4) + rank)
        usage.append(out.usage)
        ks.append(out.keep_groups)
    torch.save({"weight": q.embedding.weight.detach().clone(), "embed_prob": q.embed_prob.clone(),
                "usage": torch.stack(usage), "ks": ks}, os.path.join(path, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_reinit_keeps_codebooks_identical():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, port, d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2))
    torch.manual_seed(0)
    w_init = MultiGroupQuantizer(8, 2, 32).embedding.weight.detach()
    assert not torch.equal(r0["weight"], w_init)  # the re-init did change the codebook
    assert torch.equal(r0["weight"], r1["weight"])
    assert torch.equal(r0["embed_prob"], r1["embed_prob"])
    assert torch.equal(r0["usage"], r1["usage"])
    assert r0["ks"] == r1["ks"] and set(r0["ks"]) == {1, 2}  # one masking draw per global batch


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible by groups"):
        MultiGroupQuantizer(30, 4, 16)
    with pytest.raises(ValueError, match="codebook_size"):
        MultiGroupQuantizer(32, 4, 1)
    with pytest.raises(ValueError, match="one probability per k"):
        MultiGroupQuantizer(32, 4, 16, keep_probs=[0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        MultiGroupQuantizer(32, 4, 16, keep_probs=[0.5, 0.5, 0.5, 0.5])
    q = MultiGroupQuantizer(32, 4, 16)
    with pytest.raises(ValueError, match="keep_groups"):
        q(torch.randn(1, 32, 2, 2), keep_groups=5)
    with pytest.raises(ValueError, match="32 latent channels"):
        q(torch.randn(1, 16, 2, 2))


def test_hand_written_keep_probs_are_renormalised():
    from tokenizer.quantizer import check_keep_probs

    probs = check_keep_probs([0.2] + [0.0333] * 6 + [0.6], 8)  # the G=8 list as written in the ImageNet YAML
    assert abs(sum(probs) - 1.0) < 1e-12 and probs[0] == pytest.approx(0.2 / 0.9998)
    assert check_keep_probs([0.2, 0.1, 0.1, 0.6], 4) == [0.2, 0.1, 0.1, 0.6]  # exact lists are kept as given
    with pytest.raises(ValueError, match=r"sum to 1 \(within 1e-3\)"):
        check_keep_probs([0.2, 0.1, 0.1, 0.602], 4)


def test_per_sample_nested_masking_zeroes_each_images_suffix_and_averages_losses_over_kept():
    torch.manual_seed(0)
    G, K, C, B = 4, 16, 32, 400
    q = MultiGroupQuantizer(C, G, K, keep_probs=[0.2, 0.1, 0.1, 0.6], mask_per="sample").train()
    q.embedding.weight.data = torch.randn_like(q.embedding.weight)
    z = torch.randn(B, C, 2, 2, requires_grad=True)
    full = q.encode_indices(z)
    out = q(z)
    assert out.keep_groups == G and torch.equal(out.indices, full)  # every index is reported
    zq = out.z_q.detach().permute(0, 2, 3, 1).reshape(B, 4, G, C // G)  # (B, h*w, G, D)
    nonzero = zq.abs().sum(-1) > 0  # (B, h*w, G)
    assert (nonzero == nonzero[:, :1]).all()  # one k per image: all its positions agree
    kept = nonzero[:, 0]  # (B, G)
    k = kept.sum(1)
    assert torch.equal(kept, torch.arange(G)[None] < k[:, None])  # a prefix of the groups, never empty
    freq = torch.bincount(k, minlength=G + 1)[1:].float() / B
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.1, 0.1, 0.6]), atol=0.06, rtol=0)
    # the kept sub-tokens are the straight-through codes; the losses are means over the kept ones only
    ref = q.lookup(full).permute(0, 2, 3, 1).reshape(B, 4, G, C // G)
    torch.testing.assert_close(zq[nonzero], ref[nonzero])
    zg = torch.nn.functional.normalize(z.detach().permute(0, 2, 3, 1).reshape(B, 4, G, C // G), dim=-1)
    for g in range(G):
        m = kept[:, g]
        want = (ref[m, :, g] - zg[m, :, g]).pow(2).mean()
        torch.testing.assert_close(out.vq_loss[g], want)
        torch.testing.assert_close(out.commit_loss[g], 0.25 * want)
    # masked sub-tokens pass no gradient to the latent; eval never masks
    out.z_q.sum().backward()
    gz = z.grad.permute(0, 2, 3, 1).reshape(B, 4, G, C // G).abs().sum(-1)
    assert (gz[~nonzero] == 0).all() and (gz[nonzero] > 0).all()
    assert (q.eval()(z.detach()).z_q != 0).all()
    with pytest.raises(ValueError, match="mask_per must be one of"):
        MultiGroupQuantizer(C, G, K, mask_per="image")
    from tokenizer import MGVQTokenizer

    with pytest.raises(ValueError, match="nested_mask_per must be one of"):
        MGVQTokenizer.from_preset("mgvq-tiny", nested_mask_per="image")
    tok = MGVQTokenizer.from_preset("mgvq-tiny", nested_mask_per="sample")
    assert tok.quantize.mask_per == "sample"


def test_ema_codebook_moves_codes_to_cluster_means_without_gradient():
    torch.manual_seed(0)
    G, K, C, decay = 2, 4, 4, 0.5
    q = MultiGroupQuantizer(C, G, K, l2_norm=False, codebook_update="ema", ema_decay=decay).train()
    w0 = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]).repeat(G, 1)  # (G*K, D=2)
    q.embedding.weight.data.copy_(w0)
    q.ema_sum.copy_(w0.view(G, K, 2))
    # group 0: two features near code 0, one near code 1; group 1: all three near code 2
    f0 = torch.tensor([[2.0, 0.2], [1.0, -0.2], [0.1, 3.0]])
    f1 = torch.tensor([[-2.0, 0.0], [-1.0, 0.4], [-3.0, -0.4]])
    z = torch.cat([f0, f1], dim=1).T.reshape(1, C, 1, 3).requires_grad_(True)  # 3 positions
    out = q(z, keep_groups=G)
    assert out.indices[0, 0].tolist() == [[0, 2], [0, 2], [1, 2]]
    assert not q.embedding.weight.requires_grad and (out.vq_loss == 0).all()
    out.commit_loss.sum().backward()  # the commitment term still trains the encoder
    assert z.grad is not None and z.grad.abs().sum() > 0
    # hand-computed: count_k = 0.5 * 1 + 0.5 * n_k, sum_k = 0.5 * w0_k + 0.5 * (sum of its features);
    # code = sum / Laplace-smoothed count (total count preserved: 4 * 1 -> 0.5 * 4 + 0.5 * 3 = 3.5)
    counts = torch.tensor([[2.0, 1, 0, 0], [0, 0, 3, 0]])
    sums = torch.zeros(G, K, 2)
    sums[0, 0], sums[0, 1], sums[1, 2] = f0[:2].sum(0), f0[2], f1.sum(0)
    ema_count = 0.5 + 0.5 * counts
    ema_sum = 0.5 * w0.view(G, K, 2) + 0.5 * sums
    n = ema_count.sum(-1, keepdim=True)
    cluster = (ema_count + 1e-5) / (n + K * 1e-5) * n
    torch.testing.assert_close(q.ema_count, ema_count)
    torch.testing.assert_close(q.embedding.weight.view(G, K, 2), ema_sum / cluster[..., None])
    # a code nobody picked keeps its place (up to the smoothing)
    torch.testing.assert_close(q.embedding.weight.view(G, K, 2)[0, 3], w0[3], atol=1e-4, rtol=0)
    # eval mode: no update
    w = q.embedding.weight.clone()
    q.eval()(z.detach())
    assert torch.equal(q.embedding.weight, w)


def test_ema_codebook_state_dict_and_bad_arguments():
    assert "ema_sum" not in MultiGroupQuantizer(8, 2, 4).state_dict()  # released checkpoints' keys unchanged
    assert {"ema_sum", "ema_count"} <= set(MultiGroupQuantizer(8, 2, 4, codebook_update="ema").state_dict())
    with pytest.raises(ValueError, match="codebook_update must be one of"):
        MultiGroupQuantizer(8, 2, 4, codebook_update="kmeans")
    with pytest.raises(ValueError, match="ema_decay"):
        MultiGroupQuantizer(8, 2, 4, codebook_update="ema", ema_decay=1.0)


def test_ema_codebook_with_reinit_keeps_sums_consistent():
    torch.manual_seed(0)
    q = MultiGroupQuantizer(8, 2, 16, codebook_update="ema", dead_code_reinit=True).train()
    for _ in range(3):
        q(torch.randn(4, 8, 3, 3))
    w = q.embedding.weight.view(2, 16, 4)
    n = q.ema_count.sum(-1, keepdim=True)
    torch.testing.assert_close(q.ema_sum / ((q.ema_count + 1e-5) / (n + 16e-5) * n)[..., None], w)
