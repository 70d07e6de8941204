"""VQGAN conv encoder / decoder exactly as LlamaGen's VQ (`tokenizer/tokenizer_image/vq_model.py`, reference B.8).

Module and parameter names equal LlamaGen's, so its `encoder.*` / `decoder.*` state_dict keys load unchanged:
  encoder.conv_in, encoder.conv_blocks.{i}.{res.{j}, attn.{j}, downsample}, encoder.mid.{0,1,2}, norm_out, conv_out
  decoder.conv_in, decoder.mid.{0,1,2}, decoder.conv_blocks.{i}.{res, attn, upsample} (0 = lowest resolution), ...
GroupNorm(32, eps=1e-6) + swish; attention only at the lowest resolution (and in mid); downsample = pad (0,1,0,1) then a
stride-2 3x3 conv; upsample = nearest x2 then a 3x3 conv; the decoder has num_res_blocks + 1 blocks per level.

Small widths: GroupNorm uses gcd(norm_groups, channels) groups, i.e. 32 for every LlamaGen width (multiples of 32) and
fewer when a channel count is not a multiple of 32 (e.g. 16 channels -> 16 groups, 48 -> 16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQGANConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    in_channels: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"vqgan.ch_mult must be a non-empty list of positive ints, got {list(self.ch_mult)}")
        for name in ("ch", "num_res_blocks", "z_channels", "in_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"vqgan.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vqgan.dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int, norm_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(norm_groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = Normalize(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):  # (B, in_ch, H, W) -> (B, out_ch, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv q, k, v, proj_out, scale C^-0.5."""

    def __init__(self, ch: int, norm_groups: int = 32):
        super().__init__()
        self.norm = Normalize(ch, norm_groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        if x.dtype == torch.bfloat16:  # nearest upsampling of bf16 is not supported everywhere (LlamaGen does the same)
            return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2^(len(ch_mult)-1)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ng, n = cfg.norm_groups, len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_mult = (1,) + cfg.ch_mult
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for i in range(n):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out, cfg.dropout, ng))
                block_in = block_out
                if i == n - 1:
                    block.attn.append(AttnBlock(block_in, ng))
            if i != n - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout, ng), AttnBlock(block_in, ng),
                                  ResnetBlock(block_in, block_in, cfg.dropout, ng)])
        self.norm_out = Normalize(block_in, ng)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for block in self.conv_blocks:
            for j in range(self.num_res_blocks):
                h = block.res[j](h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)  # (B, ch*ch_mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, in_channels, h*f, w*f). conv_blocks[0] is the lowest resolution."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ng, n = cfg.norm_groups, len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout, ng), AttnBlock(block_in, ng),
                                  ResnetBlock(block_in, block_in, cfg.dropout, ng)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out, cfg.dropout, ng))
                block_in = block_out
                if i == n - 1:
                    block.attn.append(AttnBlock(block_in, ng))
            if i != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = Normalize(block_in, ng)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for j in range(self.num_res_blocks + 1):
                h = block.res[j](h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, in_channels, H, W)
