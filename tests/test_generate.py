import pytest
import torch

from generator import GPT, generate, sample_logits


def tiny(head="parallel", mode="sum", G=4, **kw):
    torch.manual_seed(0)
    extra = {}
    if mode == "projector":
        extra = dict(codebook=torch.randn(G * 32, 4), codebook_embed_dim=4 * G)
    m = GPT.from_preset("GPT-tiny", groups=G, codebook_size=32, grid=4, num_classes=10, head=head,
                        input_mode=mode, **extra, **kw)
    if head == "parallel":
        torch.nn.init.normal_(m.output.weight, std=0.3)
    return m.eval()


def guided_teacher_forced(m, codes, labels, scales):
    """Full-forward reference for what the sampler saw: CFG-combined logits per position (scale None = cond)."""
    B = labels.shape[0]
    lg = m(torch.cat([codes, codes]), torch.cat([labels, torch.full_like(labels, m.config.num_classes)]))
    cond, uncond = lg[:B], lg[B:]
    out = cond.clone()
    for t, s in enumerate(scales):
        if s is not None:
            out[:, t] = uncond[:, t] + s * (cond[:, t] - uncond[:, t])
    return out


@pytest.mark.parametrize("head,mode", [("parallel", "sum"), ("parallel", "projector"), ("ar", "projector"),
                                       ("ar", "sum")])
def test_cached_decoding_logits_equal_full_forward(head, mode):
    m = tiny(head, mode)
    labels = torch.tensor([1, 5, 9])
    g = torch.Generator().manual_seed(0)
    codes, seen = generate(m, labels, guidance_scale=3.0, temperature=1.5, top_k=8, generator=g,
                           return_logits=True)
    assert codes.shape == (3, 4, 4, 4) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 32
    ref = guided_teacher_forced(m, codes.flatten(1, 2), labels, [3.0] * 16)
    torch.testing.assert_close(seen.flatten(1, 2), ref, atol=1e-4, rtol=1e-4)


def test_gqa_cached_equals_forward():
    m = tiny(n_kv_head=2)
    codes, seen = generate(m, torch.tensor([2]), top_k=1, return_logits=True)
    torch.testing.assert_close(seen.flatten(1, 2), m(codes, torch.tensor([2])), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head", ["parallel", "ar"])
def test_cfg_scale_one_is_conditional_model_and_top_k_one_is_greedy(head):
    m = tiny(head)
    labels = torch.tensor([0, 3])
    codes, seen = generate(m, labels, guidance_scale=1.0, top_k=1, return_logits=True)
    assert torch.equal(codes, seen.argmax(-1))  # greedy
    torch.testing.assert_close(seen.flatten(1, 2), m(codes, labels), atol=1e-4, rtol=1e-4)  # = cond model
    # greedy with temperature 0 too, and independent of the generator state
    assert torch.equal(generate(m, labels, temperature=0.0, generator=torch.Generator().manual_seed(5)), codes)


def test_cfg_interval_and_linear_schedule():
    m = tiny("ar")
    labels = torch.tensor([4, 6])
    codes, seen = generate(m, labels, guidance_scale=4.0, cfg_interval=2, top_k=1, return_logits=True)
    # LlamaGen: CFG on the prefill token and decode steps i <= 2, i.e. positions t <= 3; cond only afterwards
    ref = guided_teacher_forced(m, codes.flatten(1, 2), labels, [4.0] * 4 + [None] * 12)
    torch.testing.assert_close(seen.flatten(1, 2), ref, atol=1e-4, rtol=1e-4)
    codes, seen = generate(m, labels, guidance_scale=4.0, cfg_schedule="linear", top_k=1, return_logits=True)
    ref = guided_teacher_forced(m, codes.flatten(1, 2), labels, [1.0 + 3.0 * t / 15 for t in range(16)])
    torch.testing.assert_close(seen.flatten(1, 2), ref, atol=1e-4, rtol=1e-4)


def test_per_group_top_k_and_top_p_masks():
    torch.manual_seed(0)
    K = 10
    base = torch.linspace(3.0, 0.0, K)  # strictly decreasing: token i has rank i
    logits = base.expand(500, 3, K).clone()
    g = torch.Generator().manual_seed(0)
    out = sample_logits(logits, [1.0] * 3, [1, 3, None], [None, None, None], g)
    assert (out[:, 0] == 0).all()  # top-k 1 = argmax
    assert set(out[:, 1].tolist()) == {0, 1, 2}  # top-k 3: exactly the best three appear
    assert out[:, 2].max() >= 5  # unfiltered group reaches the tail
    p = base.softmax(-1)
    cum = p.cumsum(0)
    # top-p keeps the smallest prefix whose mass reaches p: with p = cum[3] - 1e-4 that is tokens 0..3
    out = sample_logits(logits, [1.0] * 3, [None] * 3, [cum[3].item() - 1e-4, 1.0, 1e-6], g)
    assert set(out[:, 0].tolist()) == {0, 1, 2, 3}
    assert out[:, 1].max() >= 5
    assert (out[:, 2] == 0).all()  # tiny top-p keeps only the best token
    # combined: per-group temperature too; top-k 4 then top-p over the kept mass
    out = sample_logits(logits, [0.5, 2.0, 1.0], [4, 4, 2], [0.999, 1.0, 1.0], g)
    assert out.max() <= 3 and set(out[:, 2].tolist()) == {0, 1}


def test_same_seed_same_output_and_per_group_lists():
    m = tiny("ar")
    labels = torch.tensor([1, 2])
    kw = dict(guidance_scale=2.0, temperature=[1.0, 0.9, 1.1, 1.0], top_k=[8, 16, 0, None], top_p=[1.0, 0.9, 0.95, None])
    a = generate(m, labels, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(m, labels, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(m, labels, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="G=4"):
        generate(m, labels, top_k=[1, 2])
    with pytest.raises(ValueError, match="class_labels"):
        generate(m, torch.tensor([11]))
    assert m.layers[0].attention.kv_cache is None  # caches freed after each call
    assert "kv_cache" not in " ".join(m.state_dict())


def test_sampler_draws_the_filtered_distribution():
    """The exponential-race draw (argmax p / E, E ~ Exp(1)) has the softmax / top-k / top-p probabilities."""
    K, n = 8, 20000
    base = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0])
    logits = base.expand(n, 3, K).clone()
    g = torch.Generator().manual_seed(0)
    out = sample_logits(logits, [1.0, 2.0, 1.0], [None, 3, None], [None, None, 0.8], g)  # (n, 3)
    expect = [base.softmax(-1),  # plain
              torch.cat([(base[:3] / 2.0).softmax(-1), torch.zeros(5)])]  # temperature 2, top-k 3
    p = base.softmax(-1)  # top-p 0.8: the smallest prefix whose mass reaches 0.8, renormalised
    keep = int(((p.cumsum(0) - p) <= 0.8).sum())
    expect.append(torch.cat([p[:keep] / p[:keep].sum(), torch.zeros(K - keep)]))
    for col in range(3):
        freq = torch.bincount(out[:, col], minlength=K).float() / n
        torch.testing.assert_close(freq, expect[col], atol=0.015, rtol=0)  # 4 sigma of a binomial at n=20000


def test_kv_caches_are_reused_across_calls_and_released():
    from generator.generate import _CACHES, release_caches

    m = tiny("ar")
    generate(m, torch.tensor([1, 2]), guidance_scale=2.0, top_k=1)
    first = [c.k_cache.data_ptr() for c in _CACHES[m][1]]
    assert len(first) == len(m.layers) + m.config.ar_head_layers
    a = generate(m, torch.tensor([3, 4]), guidance_scale=2.0, top_k=1)  # same shape: same buffers
    assert [c.k_cache.data_ptr() for c in _CACHES[m][1]] == first
    assert m.layers[0].attention.kv_cache is None  # detached from the modules between calls
    # stale cache contents never leak: a fresh model (fresh zero caches) gives the same tokens
    fresh = tiny("ar")
    assert torch.equal(generate(fresh, torch.tensor([3, 4]), guidance_scale=2.0, top_k=1), a)
    generate(m, torch.tensor([1]), guidance_scale=2.0, top_k=1)  # another batch: one entry, new shape
    assert _CACHES[m][0][0] == 2 and _CACHES[m][1][0].k_cache.shape[0] == 2
    release_caches(m)
    assert m not in _CACHES


def test_dtype_argument():
    m = tiny()
    labels = torch.tensor([1, 2])
    codes, seen = generate(m, labels, guidance_scale=2.0, top_k=1, dtype=torch.bfloat16, return_logits=True)
    ref = generate(m, labels, guidance_scale=2.0, top_k=1)  # float32
    assert codes.shape == ref.shape and (codes == ref).float().mean() > 0.5  # bf16 autocast: close, not bitwise
    assert seen.dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        generate(m, labels, dtype="int8")
    with pytest.raises(ValueError, match="compile"):
        generate(m, labels, compile="fast")
