"""DC-AE / EfficientViT backbone of the released MGVQ tokenizers (MKJia/MGVQ `mgvq.py`, reference A.1).

Encoder: project_in (ConvPixelUnshuffle x2 when stage 0 is empty) -> stages (blocks, then a pixel-unshuffle downsample
with a channel-averaging shortcut, except after the last stage) -> project_out (conv3x3 + channel-averaging shortcut).
Decoder: project_in (conv3x3 + channel-duplicating shortcut) -> stages from last to first (a pixel-shuffle upsample with
a channel-duplicating shortcut, then blocks) -> project_out (norm -> act -> ConvPixelShuffle x2 to RGB; no tanh).
Blocks: "ResBlock" = x + [conv3x3(bias) -> act -> conv3x3 -> norm]; "EViT_GLU" = x + LiteMLA(x), then x + GLUMBConv(x).
Norms: "trms2d" = RMS norm over channels with weight AND bias (eps 1e-5, fp32); "bn2d" = BatchNorm2d.

Module names equal the reference's (OpSequential.op_list, ResidualBlock.main/shortcut, ConvLayer.conv/norm), so the
released state_dict keys (e.g. encoder.stages.1.op_list.0.main.conv1.conv.weight) load with an identity mapping.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_TYPES = ("ResBlock", "EViT_GLU")
NORMS = ("trms2d", "bn2d")
ACTS = ("relu", "silu")


@dataclass
class DCAEConfig:
    # defaults: the released f16 backbone (mgvq_f16c32_*); stage s has width width_list[s], resolution H / 2^(s+1)
    width_list: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024])
    encoder_depth_list: list[int] = field(default_factory=lambda: [0, 4, 8, 2, 2])
    decoder_depth_list: list[int] = field(default_factory=lambda: [0, 5, 10, 2, 2])
    block_type: list[str] = field(default_factory=lambda: ["ResBlock"] * 3 + ["EViT_GLU"] * 2)  # per stage
    encoder_norm: str = "trms2d"  # every encoder stage
    encoder_act: str = "silu"
    decoder_norm: list[str] | str = field(default_factory=lambda: ["bn2d"] * 3 + ["trms2d"] * 2)  # per stage
    decoder_act: list[str] | str = field(default_factory=lambda: ["relu"] * 3 + ["silu"] * 2)
    decoder_out_norm: str | None = "trms2d"
    decoder_out_act: str | None = "relu"
    in_channels: int = 3
    attn_head_dim: int = 32  # LiteMLA: heads = width // 32; quadratic attention when H*W <= attn_head_dim
    expand_ratio: int = 4  # GLUMBConv hidden = expand_ratio * width

    def __post_init__(self):
        n = len(self.width_list)
        if n < 2:
            raise ValueError(f"dcae.width_list needs >= 2 stages, got {self.width_list}")
        self.width_list = [int(w) for w in self.width_list]
        if isinstance(self.decoder_norm, str):
            self.decoder_norm = [self.decoder_norm] * n
        if isinstance(self.decoder_act, str):
            self.decoder_act = [self.decoder_act] * n
        if isinstance(self.block_type, str):
            self.block_type = [self.block_type] * n
        for name in ("encoder_depth_list", "decoder_depth_list", "block_type", "decoder_norm", "decoder_act"):
            v = list(getattr(self, name))
            setattr(self, name, v)
            if len(v) != n:
                raise ValueError(f"dcae.{name} must have one entry per stage ({n}, from width_list), got {v}")
        if any(w < 1 for w in self.width_list):
            raise ValueError(f"dcae.width_list must be positive, got {self.width_list}")
        for name in ("encoder_depth_list", "decoder_depth_list"):
            d = getattr(self, name)
            if any(int(x) < 0 for x in d) or any(int(x) < 1 for x in d[1:]):
                raise ValueError(f"dcae.{name} must be >= 0 for stage 0 and >= 1 for later stages, got {d}")
        if (self.encoder_depth_list[0] == 0) != (self.decoder_depth_list[0] == 0):
            raise ValueError("dcae: stage 0 must be empty in both or neither of encoder_depth_list "
                             f"{self.encoder_depth_list} and decoder_depth_list {self.decoder_depth_list}")
        for name, valid in (("block_type", BLOCK_TYPES), ("decoder_norm", NORMS), ("decoder_act", ACTS)):
            bad = [v for v in getattr(self, name) if v not in valid]
            if bad:
                raise ValueError(f"dcae.{name} has invalid entries {bad}; valid: {valid}")
        for name, valid in (("encoder_norm", NORMS), ("encoder_act", ACTS),
                            ("decoder_out_norm", NORMS + (None,)), ("decoder_out_act", ACTS + (None,))):
            if getattr(self, name) not in valid:
                raise ValueError(f"dcae.{name} must be one of {valid}, got {getattr(self, name)!r}")
        for s in range(n):
            has_blocks = self.encoder_depth_list[s] + self.decoder_depth_list[s] > 0
            if has_blocks and self.block_type[s] == "EViT_GLU" and self.width_list[s] % self.attn_head_dim:
                raise ValueError(f"dcae stage {s}: EViT_GLU width {self.width_list[s]} must be a multiple of "
                                 f"attn_head_dim {self.attn_head_dim}")
            if s < n - 1 and (4 * self.width_list[s]) % self.width_list[s + 1]:
                raise ValueError(f"dcae stages {s}->{s + 1}: 4 * width {self.width_list[s]} must be a multiple of "
                                 f"width {self.width_list[s + 1]} (channel averaging / duplicating shortcuts)")
        if self.encoder_depth_list[0] == 0 and self.width_list[1] % 4:
            raise ValueError(f"dcae.width_list[1] ({self.width_list[1]}) must be a multiple of 4 (pixel unshuffle)")

    @property
    def num_stages(self) -> int:
        return len(self.width_list)

    @property
    def downsample(self) -> int:
        # x2 in project_in (stage 0 empty) or after stage 0, then after stages 1 .. n-2
        return 2 ** (self.num_stages - 1)


# ---- norms, activations, basic layers --------------------------------------------------------------------------------
class RMSNorm2d(nn.Module):
    """'trms2d': y = x * rsqrt(mean_c x^2 + eps) * weight + bias over the channel dim, in fp32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + self.eps)
        y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


def build_norm(name: str | None, channels: int) -> nn.Module | None:
    if name is None:
        return None
    return RMSNorm2d(channels) if name == "trms2d" else nn.BatchNorm2d(channels)


def build_act(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    return nn.ReLU() if name == "relu" else nn.SiLU()


class ConvLayer(nn.Module):
    """conv (same padding) -> optional norm -> optional act."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, groups: int = 1, bias: bool = False,
                 norm: str | None = None, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        self.norm = build_norm(norm, cout)
        self.act = build_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    def __init__(self, ops: list[nn.Module | None]):
        super().__init__()
        self.op_list = nn.ModuleList([op for op in ops if op is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    """main(x) + shortcut(x) (shortcut defaults to identity)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


# ---- blocks ----------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv3x3 (bias) -> act -> conv3x3 (no bias) -> norm: the residual branch (post-norm inside the branch)."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=act)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """ReLU linear attention (EfficientViT), heads of dim `head_dim`, computed in fp32; no multi-scale aggregation."""

    def __init__(self, channels: int, norm: str, head_dim: int = 32, eps: float = 1e-15):
        super().__init__()
        self.dim, self.eps = head_dim, eps
        total = (channels // head_dim) * head_dim
        self.qkv = ConvLayer(channels, 3 * total, 1, bias=False)
        self.proj = ConvLayer(total, channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, _, H, W = x.shape
        d = self.dim
        qkv = self.qkv(x)
        with torch.autocast(x.device.type, enabled=False):
            qkv = qkv.float().reshape(B, -1, 3 * d, H * W)  # (B, heads, [q | k | v], N)
            q, k, v = F.relu(qkv[:, :, :d]), F.relu(qkv[:, :, d:2 * d]), qkv[:, :, 2 * d:]  # (B, h, d, N) each
            if H * W > d:  # linear: the padded row of ones makes the normaliser come out of the same matmul
                v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # (B, h, d+1, N)
                out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)  # (B, h, d+1, N)
                out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
            else:  # quadratic ReLU attention on tiny maps
                att = torch.matmul(k.transpose(-1, -2), q)  # (B, h, N_k, N_q)
                att = att / (att.sum(dim=2, keepdim=True) + self.eps)
                out = torch.matmul(v, att)  # (B, h, d, N)
        return self.proj(out.reshape(B, -1, H, W).to(x.dtype))


class GLUMBConv(nn.Module):
    """1x1 (C -> 2*e*C, act) -> depthwise 3x3 -> x * act(gate) -> 1x1 (e*C -> C, no bias) -> norm."""

    def __init__(self, channels: int, expand_ratio: int, norm: str, act: str):
        super().__init__()
        mid = channels * expand_ratio
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, act=act)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, bias=True)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=norm)
        self.glu_act = build_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)  # (B, e*C, H, W) each
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, norm: str, act: str, head_dim: int, expand_ratio: int):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, norm, head_dim))
        self.local_module = ResidualBlock(GLUMBConv(channels, expand_ratio, norm, act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


def build_block(cfg: DCAEConfig, stage: int, norm: str, act: str) -> nn.Module:
    width = cfg.width_list[stage]
    if cfg.block_type[stage] == "ResBlock":
        return ResidualBlock(ResBlock(width, norm, act))
    return EfficientViTBlock(width, norm, act, cfg.attn_head_dim, cfg.expand_ratio)


# ---- resamplers ------------------------------------------------------------------------------------------------------
class ConvPixelUnshuffle(nn.Module):
    """conv3x3 (cin -> cout/4, bias) -> pixel_unshuffle(2): (B, cin, H, W) -> (B, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvLayer(cin, cout // 4, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), 2)


class PixelUnshuffleChannelAveraging(nn.Module):
    """pixel_unshuffle(factor), then the mean over consecutive groups of cin*factor^2/cout channels."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        if (cin * factor ** 2) % cout:
            raise ValueError(f"channel averaging needs cin*factor^2 ({cin}*{factor}^2) to be a multiple of cout {cout}")
        self.cout, self.factor, self.group = cout, factor, cin * factor ** 2 // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            x = F.pixel_unshuffle(x, self.factor)
        B, _, H, W = x.shape
        return x.view(B, self.cout, self.group, H, W).mean(dim=2)


class ConvPixelShuffle(nn.Module):
    """conv3x3 (cin -> 4*cout, bias) -> pixel_shuffle(2): (B, cin, H, W) -> (B, cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvLayer(cin, cout * 4, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class ChannelDuplicating(nn.Module):
    """repeat_interleave(cout*factor^2/cin) over channels, then pixel_shuffle(factor)."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        if (cout * factor ** 2) % cin:
            raise ValueError(f"channel duplicating needs cout*factor^2 ({cout}*{factor}^2) to be a multiple of "
                             f"cin {cin}")
        self.factor, self.repeats = factor, cout * factor ** 2 // cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.repeats, dim=1)
        return F.pixel_shuffle(x, self.factor) if self.factor > 1 else x


# ---- encoder / decoder -----------------------------------------------------------------------------------------------
class DCAEEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, latent_dim, H/f, W/f), f = 2^(num_stages - 1)."""

    def __init__(self, cfg: DCAEConfig, latent_dim: int):
        super().__init__()
        w, depth, n = cfg.width_list, cfg.encoder_depth_list, cfg.num_stages
        if w[-1] % latent_dim:
            raise ValueError(f"dcae.width_list[-1] ({w[-1]}) must be a multiple of latent_dim ({latent_dim})")
        if depth[0] == 0:
            self.project_in = ConvPixelUnshuffle(cfg.in_channels, w[1])  # (B, w1, H/2, W/2)
        else:
            self.project_in = ConvLayer(cfg.in_channels, w[0], 3, bias=True)
        stages = []
        for s in range(n):
            ops = [build_block(cfg, s, cfg.encoder_norm, cfg.encoder_act) for _ in range(depth[s])]
            if s < n - 1 and depth[s] > 0:
                ops.append(ResidualBlock(ConvPixelUnshuffle(w[s], w[s + 1]),
                                         PixelUnshuffleChannelAveraging(w[s], w[s + 1], 2)))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = ResidualBlock(OpSequential([ConvLayer(w[-1], latent_dim, 3, bias=True)]),
                                         PixelUnshuffleChannelAveraging(w[-1], latent_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            if len(stage.op_list):
                x = stage(x)
        return self.project_out(x)


class DCAEDecoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, in_channels, h*f, w*f), nominally in [-1, 1] (no tanh)."""

    def __init__(self, cfg: DCAEConfig, latent_dim: int):
        super().__init__()
        w, depth, n = cfg.width_list, cfg.decoder_depth_list, cfg.num_stages
        if w[-1] % latent_dim:
            raise ValueError(f"dcae.width_list[-1] ({w[-1]}) must be a multiple of latent_dim ({latent_dim})")
        self.project_in = ResidualBlock(ConvLayer(latent_dim, w[-1], 3, bias=True),
                                        ChannelDuplicating(latent_dim, w[-1], 1))
        stages = []
        for s in range(n):
            ops = []
            if s < n - 1 and depth[s] > 0:
                ops.append(ResidualBlock(ConvPixelShuffle(w[s + 1], w[s]), ChannelDuplicating(w[s + 1], w[s], 2)))
            ops += [build_block(cfg, s, cfg.decoder_norm[s], cfg.decoder_act[s]) for _ in range(depth[s])]
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)  # index = stage; run from the last to the first
        c0 = w[0] if depth[0] > 0 else w[1]
        if depth[0] > 0:
            out_conv = ConvLayer(c0, cfg.in_channels, 3, bias=True)
        else:
            out_conv = ConvPixelShuffle(c0, cfg.in_channels)  # (B, 3, H, W)
        self.project_out = OpSequential([build_norm(cfg.decoder_out_norm, c0), build_act(cfg.decoder_out_act),
                                         out_conv])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in reversed(self.stages):
            if len(stage.op_list):
                x = stage(x)
        return self.project_out(x)


# ---- presets (TokenizerConfig kwargs) --------------------------------------------------------------------------------
def _released(widths: list[int], enc: list[int], dec: list[int], n_evit: int, groups: int, codebook_size: int) -> dict:
    n_res = len(widths) - n_evit
    dcae = dict(width_list=widths, encoder_depth_list=enc, decoder_depth_list=dec,
                block_type=["ResBlock"] * n_res + ["EViT_GLU"] * n_evit, encoder_norm="trms2d", encoder_act="silu",
                decoder_norm=["bn2d"] * n_res + ["trms2d"] * n_evit, decoder_act=["relu"] * n_res + ["silu"] * n_evit)
    return dict(backbone="dcae", dcae=dcae, latent_dim=32, groups=groups, codebook_size=codebook_size,
                grouped_quant_conv=True, nested_keep_probs="default", dead_code_reinit=True, image_size=256)


_F8 = ([128, 256, 512, 512], [0, 4, 8, 2], [0, 5, 10, 2], 1)
_F16 = ([128, 256, 512, 512, 1024], [0, 4, 8, 2, 2], [0, 5, 10, 2, 2], 2)
_F32 = ([128, 256, 512, 512, 1024, 1024], [0, 4, 8, 2, 2, 2], [0, 5, 10, 2, 2, 2], 3)

RELEASED_PRESETS: dict[str, dict] = {
    # the six released checkpoints (HF mkjia/MGVQ; `mgvq convert --from mgvq-tokenizer` loads them); G4 = 4 x 8192
    # codes of dim 8, G8 = 8 x 2048 codes of dim 4; "_mix" = same architecture, other training data
    "mgvq_f8c32_g4": _released(*_F8, 4, 8192),
    "mgvq_f8c32_g8": _released(*_F8, 8, 2048),
    "mgvq_f16c32_g4": _released(*_F16, 4, 8192),
    "mgvq_f16c32_g8": _released(*_F16, 8, 2048),
    "mgvq_f16c32_g4_mix": _released(*_F16, 4, 8192),
    "mgvq_f32c32_g8_mix": _released(*_F32, 8, 2048),
    # tiny DC-AE (f4: 32x32 -> 8x8 grid of 4 sub-tokens) that trains on a CPU
    "mgvq-dcae-tiny": dict(_released([16, 32, 64], [0, 1, 1], [0, 1, 1], 1, 4, 256), usage_window=8192,
                           image_size=32),
}
