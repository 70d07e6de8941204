"""Stage-one loss terms against hand-computed values (tokenizer/losses.py)."""
import math
from types import SimpleNamespace

import pytest
import torch

from tokenizer.losses import (LossConfig, NLayerDiscriminator, TokenizerLoss, adopt_weight, charbonnier_loss,
                              hinge_d_loss, hinge_g_loss, l2_loss)


def test_charbonnier_and_l2_hand_values():
    x = torch.tensor([0.0, 1.0, -0.5, 0.25])
    y = torch.tensor([0.0, 0.0, 0.5, 0.25])
    # diffs 0, 1, -1, 0 -> sqrt(d^2 + eps^2)
    eps = 1e-3
    expect = (eps + math.sqrt(1 + eps**2) * 2 + eps) / 4
    assert charbonnier_loss(x, y, eps).item() == pytest.approx(expect, rel=1e-6)
    assert charbonnier_loss(x, y, 0.5).item() == pytest.approx((0.5 + 2 * math.sqrt(1.25) + 0.5) / 4, rel=1e-6)
    assert l2_loss(x, y).item() == pytest.approx(0.5)


def test_hinge_losses_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r): 0, 0.5, 2 -> mean 0.8333
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f): 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3)
    assert adopt_weight(0.5, 19999, 20000) == 0.0 and adopt_weight(0.5, 20000, 20000) == 0.5


def test_patchgan_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, 3)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    hand = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 2 * 128 + 128 * 256 * 16 + 2 * 256 + 256 * 512 * 16 + 2 * 512 + 512 * 16 + 1
    assert sum(p.numel() for p in d.parameters()) == hand == 2_765_633
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert d(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def _out(recon, vq, commit, keep):
    return SimpleNamespace(recon=recon, vq_loss=torch.tensor(vq), commit_loss=torch.tensor(commit), keep_groups=keep)


def test_tokenizer_loss_combines_terms():
    cfg = LossConfig(l2_weight=1.0, charbonnier_weight=2.0, perceptual_weight=0.0, codebook_weight=1.0,
                     disc_weight=0.5, disc_start=10)
    loss = TokenizerLoss(cfg)
    x = torch.zeros(2, 3, 32, 32)
    recon = torch.full((2, 3, 32, 32), 0.5)
    out = _out(recon, [0.1, 0.2, 0.3, 0.4], [0.01, 0.02, 0.03, 0.04], keep=2)
    total, t = loss.generator_loss(x, out, step=0)
    assert t["l2"] == pytest.approx(0.25)
    assert t["charbonnier"] == pytest.approx(math.sqrt(0.25 + 1e-6))
    assert t["vq"] == pytest.approx(0.3) and t["commit"] == pytest.approx(0.03)  # only the 2 kept groups
    assert t["g_adv"] == 0.0  # before disc_start: adopt_weight zeroes it (and D is not even run)
    assert total.item() == pytest.approx(0.25 + 2 * math.sqrt(0.25 + 1e-6) + 0.33, rel=1e-6)
    # after disc_start the hinge G term enters with weight 0.5
    total2, t2 = loss.generator_loss(x, out, step=10)
    logits = loss.discriminator(recon)
    assert t2["g_adv"] == pytest.approx(-logits.mean().item(), rel=1e-4, abs=1e-6)
    assert total2.item() == pytest.approx(total.item() + 0.5 * t2["g_adv"], rel=1e-5, abs=1e-6)
    # discriminator loss: zero weight before start, hinge after
    d0, _ = loss.discriminator_loss(x, recon, step=9)
    assert d0.item() == 0.0
    loss.discriminator.eval()  # fixed BN statistics so the hand computation sees the same logits
    d1, td = loss.discriminator_loss(x, recon, step=10)
    expect = hinge_d_loss(loss.discriminator(x), loss.discriminator(recon)).item()
    assert td["d_loss"] == pytest.approx(expect, rel=1e-6) and d1.item() == pytest.approx(0.5 * expect, rel=1e-6)


def test_perceptual_term_uses_lpips_vgg(lpips_weights_dir):
    from tokenizer.lpips import load_lpips

    loss = TokenizerLoss(LossConfig(perceptual_weight=1.0, disc_weight=0.0), lpips_dir=str(lpips_weights_dir))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    recon = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    out = _out(recon, [0.0], [0.0], keep=1)
    _, t = loss.generator_loss(x, out, step=0)
    ref = load_lpips("vgg", lpips_weights_dir)(recon, x).mean().item()
    assert t["perceptual"] == pytest.approx(ref, rel=1e-5) and t["perceptual"] > 0.01
    assert loss.discriminator is None
    with pytest.raises(ValueError, match="disc_weight == 0"):
        loss.discriminator_loss(x, recon, 0)


def test_loss_config_errors_name_the_field():
    with pytest.raises(ValueError, match="loss.l2_weight must be a number >= 0, got -1"):
        LossConfig(l2_weight=-1)
    with pytest.raises(ValueError, match="perceptual_net"):
        LossConfig(perceptual_net="resnet")
