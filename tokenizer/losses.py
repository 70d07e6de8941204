"""Stage-one losses: Charbonnier + L2 reconstruction, LPIPS-VGG perceptual, PatchGAN hinge GAN, VQ / commitment.

Paper eq. 5 (MGVQ, following LlamaGen): L = L2 + Charbonnier + w_p LPIPS + w_cb (vq + commit) + w_adv L_G.
LlamaGen defaults (reference B.8): L2 1.0, LPIPS-VGG 1.0, PatchGAN (3 layers, ndf 64, BatchNorm) with hinge losses,
disc_weight 0.5 switched on at step disc_start = 20000 (`adopt_weight` zeroes G and D adversarial terms before), no
adaptive weight. The Charbonnier weight is not recoverable from the paper text; 1.0 is our choice.
Continuous baselines (tokenizer quantizer "kl"): + kl_weight * KL, as SD-VAE (see `LossConfig.kl_weight`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- functional ------------------------------------------------------------------------------------------------------
def charbonnier_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean sqrt((x - y)^2 + eps^2) (a smooth L1)."""
    return torch.sqrt((x.float() - y.float()).pow(2) + eps * eps).mean()


def l2_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x.float(), y.float())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def adopt_weight(weight: float, step: int, threshold: int) -> float:
    """`weight` from step `threshold` on, 0 before (taming / LlamaGen)."""
    return weight if step >= threshold else 0.0


# ---- discriminator ---------------------------------------------------------------------------------------------------
class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming / LlamaGen): k4 convs, stride 2 for the first n_layers, BatchNorm, LeakyReLU 0.2.

    Output (B, 1, h, w) patch logits; for 256 px and 3 layers h = w = 30, for 32 px h = w = 2."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"NLayerDiscriminator needs n_layers >= 1 and ndf >= 1, got n_layers={n_layers}, "
                             f"ndf={ndf}")
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, 2, padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, padw, bias=False), nn.BatchNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, padw, bias=False), nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, kw, 1, padw)]
        self.main = nn.Sequential(*seq)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """D(x); with y, the pair (D(x), D(y)) as two BatchNorm passes inside one (DDP) forward, like LlamaGen."""
        if y is None:
            return self.main(x)
        return self.main(x), self.main(y)


# ---- perceptual ------------------------------------------------------------------------------------------------------
class PerceptualLoss(nn.Module):
    """LPIPS (v0.1, exact ImageNet backbone from `tokenizer.lpips`), inputs in [-1, 1]; returns the batch mean."""

    def __init__(self, net: str = "vgg", weights_dir: str | None = None):
        super().__init__()
        from tokenizer.lpips import load_lpips

        self.lpips = load_lpips(net, weights_dir)

    def train(self, mode: bool = True):  # always eval (dropout off), frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y).float().mean()


# ---- the full stage-one loss -----------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    l2_weight: float = 1.0
    charbonnier_weight: float = 1.0
    charbonnier_eps: float = 1e-3
    perceptual_weight: float = 1.0  # 0 skips building LPIPS
    perceptual_net: str = "vgg"
    codebook_weight: float = 1.0  # on sum over kept groups of (vq + commit); commit already carries beta
    # quantizer "kl" only: weight of KL(q(z|x) || N(0, I)) summed over the latent and divided by the number of pixel
    # values of an image (3 H W). SD-VAE sums its pixel losses per image and uses 1e-6 on the summed KL; our pixel
    # losses are means, so this per-pixel normalisation keeps SD-VAE's balance with the same 1e-6.
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 20000
    disc_ndf: int = 64
    disc_layers: int = 3

    def __post_init__(self):
        for name in ("l2_weight", "charbonnier_weight", "perceptual_weight", "codebook_weight", "kl_weight",
                     "disc_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"loss.{name} must be a number >= 0, got {v!r}")
        if self.charbonnier_eps <= 0:
            raise ValueError(f"loss.charbonnier_eps must be > 0, got {self.charbonnier_eps}")
        if self.disc_start < 0:
            raise ValueError(f"loss.disc_start must be >= 0, got {self.disc_start}")
        if self.perceptual_net not in ("vgg", "alex"):
            raise ValueError(f"loss.perceptual_net must be 'vgg' or 'alex', got {self.perceptual_net!r}")

    def uses_disc(self) -> bool:
        return self.disc_weight > 0


class TokenizerLoss(nn.Module):
    """All stage-one loss terms from `LossConfig`. Owns the (frozen) LPIPS net and the PatchGAN discriminator.

    `generator_loss(x, out, step)` and `discriminator_loss(x, recon, step)` return (loss, dict of float terms).
    Pass `disc=` the accelerate/DDP-wrapped discriminator when training distributed (default: self.discriminator).
    """

    def __init__(self, config: LossConfig | None = None, lpips_dir: str | None = None):
        super().__init__()
        self.config = cfg = config or LossConfig()
        self.perceptual = PerceptualLoss(cfg.perceptual_net, lpips_dir) if cfg.perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(3, cfg.disc_ndf, cfg.disc_layers) if cfg.uses_disc() else None

    def disc_factor(self, step: int) -> float:
        return adopt_weight(self.config.disc_weight, step, self.config.disc_start) if self.config.uses_disc() else 0.0

    def generator_loss(self, x: torch.Tensor, out, step: int, disc: nn.Module | None = None):
        cfg = self.config
        recon = out.recon
        terms: dict[str, torch.Tensor] = {}
        terms["l2"] = l2_loss(recon, x)
        terms["charbonnier"] = charbonnier_loss(recon, x, cfg.charbonnier_eps)
        zero = terms["l2"].new_zeros(())
        terms["perceptual"] = self.perceptual(recon, x) if self.perceptual is not None else zero
        k = int(out.keep_groups)
        terms["vq"] = out.vq_loss[:k].float().sum()
        terms["commit"] = out.commit_loss[:k].float().sum()
        kl = getattr(out, "kl_loss", None)  # continuous "kl" tokenizers only
        terms["kl"] = kl.float() / x[0].numel() if kl is not None else zero
        factor = self.disc_factor(step)
        if factor > 0:
            terms["g_adv"] = hinge_g_loss((disc or self.discriminator)(recon.contiguous()))
        else:
            terms["g_adv"] = zero
        total = (cfg.l2_weight * terms["l2"] + cfg.charbonnier_weight * terms["charbonnier"]
                 + cfg.perceptual_weight * terms["perceptual"]
                 + cfg.codebook_weight * (terms["vq"] + terms["commit"]) + cfg.kl_weight * terms["kl"]
                 + factor * terms["g_adv"])
        terms["total"] = total
        return total, {k_: float(v.detach()) for k_, v in terms.items()}

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int, disc: nn.Module | None = None):
        """Hinge D loss on real x vs detached recon, times adopt_weight(disc_weight). Returns (loss, terms)."""
        factor = self.disc_factor(step)
        d = disc or self.discriminator
        if d is None:
            raise ValueError("discriminator_loss called but loss.disc_weight == 0 (no discriminator built)")
        real, fake = d(x.contiguous().detach(), recon.contiguous().detach())
        loss = hinge_d_loss(real, fake)
        terms = {"d_loss": float(loss.detach()), "logits_real": float(real.detach().float().mean()),
                 "logits_fake": float(fake.detach().float().mean())}
        return factor * loss, terms
