"""MGVQ tokenizer: encoder -> quant_conv -> multi-group quantizer -> post_quant_conv -> decoder.

Backbones: "vqgan" (LlamaGen's conv VQGAN, `tokenizer.vqgan`) or "dcae" (the DC-AE/EfficientViT backbone of the released
MGVQ checkpoints, `tokenizer.dcae`, imported lazily). `TokenizerConfig` is the single source of truth; YAML and presets
only overlay it. Checkpoints: `save_pretrained(dir)` writes model.safetensors + config.json.

Bottleneck (`quantizer`): "vq" = the multi-group quantizer (MGVQ); the continuous baselines of the paper's question
("could VQ-VAE beat VAE?") keep the same encoder, decoder and latent C: "none" = a plain autoencoder (the latent passes
through), "kl" = a KL-regularised VAE as SD-VAE (quant_conv predicts mean and log-variance; training samples
z = mean + std * eps and returns KL(q(z|x) || N(0, I)); eval uses the mean). Continuous tokenizers have no indices:
use `encode_latent` / `decode_latent`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from runtime.hub import MGVQHubMixin, load_safetensors, read_json, resolve_folder
from tokenizer.quantizer import CODEBOOK_UPDATES, MASK_PER, MultiGroupQuantizer, check_keep_probs, default_keep_probs
from tokenizer.vqgan import Decoder, Encoder, VQGANConfig

BACKBONES = ("vqgan", "dcae")
QUANTIZERS = ("vq", "none", "kl")


@dataclass
class TokenizerConfig:
    backbone: str = "vqgan"  # "vqgan" | "dcae"
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    dcae: dict | None = None  # kwargs for tokenizer.dcae.DCAEConfig when backbone == "dcae"
    quantizer: str = "vq"  # "vq" (multi-group VQ) | "none" (plain autoencoder) | "kl" (SD-VAE-style KL VAE)
    latent_dim: int = 32  # C
    groups: int = 4  # G sub-tokens per position, each of dim C/G
    codebook_size: int = 8192  # K codes per group
    beta: float = 0.25
    l2_norm: bool = True
    grouped_quant_conv: bool = False  # True: released MGVQ's Conv2d(C, C, 1, groups=G) both ways
    nested_keep_probs: list[float] | None = None  # P(keep first k groups), k = 1..G; None: no masking; "default"
    nested_mask_per: str = "batch"  # "batch": one k per batch (released MGVQ) | "sample": one k per image
    # (the fields from codebook_size to reinit_decay only act when quantizer == "vq"; nested masking is set to None
    # for the continuous bottlenecks, so that e.g. from_preset("mgvq-tiny", quantizer="kl") works)
    usage_window: int = 65536
    dead_code_reinit: bool = False
    reinit_decay: float = 0.01
    codebook_update: str = "grad"  # "grad": the vq loss trains the codes (released) | "ema": EMA cluster means
    ema_decay: float = 0.99  # codebook_update="ema" only
    image_size: int = 256  # default training / evaluation resolution

    def __post_init__(self):
        if isinstance(self.vqgan, dict):
            self.vqgan = _build(VQGANConfig, self.vqgan, "vqgan")
        if not isinstance(self.vqgan, VQGANConfig):
            raise TypeError(f"vqgan must be a VQGANConfig or dict, got {type(self.vqgan).__name__}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "dcae" and not isinstance(self.dcae, dict):
            raise ValueError("backbone='dcae' needs dcae = dict of tokenizer.dcae.DCAEConfig kwargs, got "
                             f"{self.dcae!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer != "vq":
            self.nested_keep_probs = None  # masking sub-tokens is a property of the multi-group quantizer
            if self.quantizer == "kl" and self.grouped_quant_conv and self.groups > 1:
                # a grouped C -> 2C conv would give the mean and the log-variance different groups of channels
                raise ValueError(f"quantizer='kl' with grouped_quant_conv=True needs groups=1 (got {self.groups}); "
                                 f"or set grouped_quant_conv=False")
        if self.groups < 1 or self.latent_dim < 1 or self.latent_dim % self.groups:
            raise ValueError(f"latent_dim ({self.latent_dim}) must be a positive multiple of groups ({self.groups})")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size (codes per group) must be >= 2, got {self.codebook_size}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {self.usage_window}")
        if not 0.0 < self.reinit_decay < 1.0:
            raise ValueError(f"reinit_decay must be in (0, 1), got {self.reinit_decay}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {self.codebook_update!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.nested_keep_probs == "default":
            self.nested_keep_probs = default_keep_probs(self.groups)
        if self.nested_keep_probs is not None:
            self.nested_keep_probs = check_keep_probs(self.nested_keep_probs, self.groups, "nested_keep_probs")
        if self.nested_mask_per not in MASK_PER:
            raise ValueError(f"nested_mask_per must be one of {MASK_PER}, got {self.nested_mask_per!r}")
        if self.grouped_quant_conv and self.backbone == "vqgan" and self.vqgan.z_channels != self.latent_dim:
            raise ValueError(f"grouped_quant_conv=True maps C -> C, so vqgan.z_channels ({self.vqgan.z_channels}) must "
                             f"equal latent_dim ({self.latent_dim})")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of the downsample factor "
                             f"({self.downsample})")

    @property
    def downsample(self) -> int:
        """Spatial reduction f: an image of H x W gives an (H/f) x (W/f) grid of G sub-tokens."""
        if self.backbone == "vqgan":
            return self.vqgan.downsample
        return int(_dcae_module().DCAEConfig(**self.dcae).downsample)

    def grid(self, image_size: int | None = None) -> int:
        size = self.image_size if image_size is None else image_size
        if size % self.downsample:
            raise ValueError(f"image size {size} is not a multiple of the downsample factor {self.downsample}")
        return size // self.downsample

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vqgan"]["ch_mult"] = list(self.vqgan.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return _build(cls, d, "TokenizerConfig")


def _build(cls, d: dict, what: str):
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid: {sorted(valid)}")
    return cls(**d)


def _dcae_module():
    return importlib.import_module("tokenizer.dcae")


def apply_overrides(base: dict, overrides: dict) -> dict:
    """Overlay `overrides` on a (nested) config dict. Keys may be dotted ("vqgan.ch"); dict values merge."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if dataclasses.is_dataclass(node[p]):
                node[p] = dataclasses.asdict(node[p])
            if not isinstance(node[p], dict):
                raise ValueError(f"override {key!r}: {p!r} is not a nested config section")
            node = node[p]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = apply_overrides(node[leaf], value)
        else:
            node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


# ---- output ----------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerOutput:
    """Continuous bottlenecks (quantizer "none" / "kl"): indices None, keep_groups 0 and empty (0,) vq_loss /
    commit_loss / usage / perplexity; kl_loss is set for "kl" only."""

    recon: torch.Tensor  # (B, 3, H, W)
    indices: torch.Tensor | None  # (B, h, w, keep_groups) int64
    vq_loss: torch.Tensor  # (G,)
    commit_loss: torch.Tensor  # (G,)
    keep_groups: int
    usage: torch.Tensor  # (G,)
    perplexity: torch.Tensor  # (G,)
    kl_loss: torch.Tensor | None = None  # () KL(q(z|x) || N(0, I)) summed over the latent, mean over the batch


# ---- model -----------------------------------------------------------------------------------------------------------
class MGVQTokenizer(nn.Module, MGVQHubMixin, tags=["image-tokenizer", "vector-quantization"]):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = cfg = config
        C, G = cfg.latent_dim, cfg.groups
        if cfg.backbone == "vqgan":
            self.encoder, self.decoder = Encoder(cfg.vqgan), Decoder(cfg.vqgan)
            z_ch = cfg.vqgan.z_channels
        else:
            dcae = _dcae_module()
            dcfg = dcae.DCAEConfig(**cfg.dcae)
            self.encoder, self.decoder = dcae.DCAEEncoder(dcfg, C), dcae.DCAEDecoder(dcfg, C)
            z_ch = C
        moments = 2 * C if cfg.quantizer == "kl" else C  # "kl": mean and log-variance
        if cfg.grouped_quant_conv:
            self.quant_conv = nn.Conv2d(C, moments, 1, groups=G)
            self.post_quant_conv = nn.Conv2d(C, C, 1, groups=G)
        else:
            self.quant_conv = nn.Conv2d(z_ch, moments, 1)
            self.post_quant_conv = nn.Conv2d(C, z_ch, 1)
        self.quantize = None  # continuous bottlenecks have no parameters
        if cfg.quantizer == "vq":
            self.quantize = MultiGroupQuantizer(C, G, cfg.codebook_size, cfg.beta, cfg.l2_norm, cfg.usage_window,
                                                cfg.dead_code_reinit, cfg.reinit_decay, cfg.nested_keep_probs,
                                                cfg.nested_mask_per, cfg.codebook_update, cfg.ema_decay)

    @property
    def is_quantized(self) -> bool:
        """False for the continuous baselines (quantizer "none" / "kl"), which have no indices or codebook."""
        return self.quantize is not None

    def _require_quantized(self, what: str, instead: str) -> None:
        if not self.is_quantized:
            raise ValueError(f"{what} needs a vector-quantized tokenizer, but this one has quantizer="
                             f"{self.config.quantizer!r} (a continuous latent, no indices); use {instead}")

    # ---- stage-one API ---------------------------------------------------------------------------------------------
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latent (B, C, h, w): the pre-quantization latent ("vq"), the autoencoder's latent
        ("none") or the posterior mean ("kl", SD-VAE's `.mode()`)."""
        h = self.quant_conv(self.encoder(x))
        return h[:, :self.config.latent_dim] if self.config.quantizer == "kl" else h

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> indices (B, h, w, G) int64, local per group in [0, K)."""
        self._require_quantized("encode", "encode_latent(x) -> (B, C, h, w) and decode_latent(z)")
        f = self.config.downsample
        if x.dim() != 4 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"encode expects (B, 3, H, W) with H, W multiples of {f}, got {tuple(x.shape)}")
        return self.quantize.encode_indices(self.encode_latent(x))

    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) quantized (or, for a continuous tokenizer, continuous) latent -> (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode(self, indices: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """indices (B, h, w, G) -> images (B, 3, H, W) in [-1, 1] (not clamped); groups >= groups_to_use are zeroed."""
        self._require_quantized("decode", "decode_latent(z) on z = encode_latent(x)")
        return self.decode_latent(self.quantize.lookup(indices, groups_to_use).to(self.post_quant_conv.weight.dtype))

    def forward(self, x: torch.Tensor, keep_groups: int | None = None) -> TokenizerOutput:
        """Training forward. keep_groups=None: nested masking draws k in training (if enabled), else all groups."""
        if not self.is_quantized:
            return self._forward_continuous(x, keep_groups)
        q = self.quantize(self.encode_latent(x), keep_groups)
        recon = self.decode_latent(q.z_q.to(x.dtype))
        return TokenizerOutput(recon, q.indices, q.vq_loss, q.commit_loss, q.keep_groups, q.usage, q.perplexity)

    def _forward_continuous(self, x: torch.Tensor, keep_groups: int | None) -> TokenizerOutput:
        if keep_groups is not None:
            raise ValueError(f"keep_groups={keep_groups} needs quantizer='vq' (a continuous latent has no sub-tokens "
                             f"to keep); this tokenizer has quantizer={self.config.quantizer!r}")
        h = self.quant_conv(self.encoder(x))
        kl = None
        if self.config.quantizer == "kl":
            mean, logvar = h.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)  # SD-VAE's DiagonalGaussianDistribution
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
            h = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.training else mean
        recon = self.decode_latent(h.to(x.dtype))
        empty = recon.new_zeros(0, dtype=torch.float32)
        return TokenizerOutput(recon, None, empty, empty, 0, empty, empty, kl)

    def codebook(self) -> torch.Tensor:
        """Raw code vectors (G, K, C/G) (not normalised), the generator's projector input."""
        self._require_quantized("codebook", "a quantizer='vq' tokenizer for the generator's projector")
        return self.quantize.codebook()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- construction / IO -----------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: TokenizerConfig | dict, **overrides) -> "MGVQTokenizer":
        d = config.to_dict() if isinstance(config, TokenizerConfig) else dict(config)
        return cls(TokenizerConfig.from_dict(apply_overrides(d, overrides)))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MGVQTokenizer":
        """Build a preset; overrides may use dotted keys, e.g. from_preset("mgvq-tiny", **{"vqgan.ch": 64})."""
        return cls(preset_config(name, **overrides))

    # save_pretrained(dir, metrics=None) / push_to_hub(repo_id): runtime.hub.MGVQHubMixin (+ a model card README.md)
    def _save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None, force_download: bool = False,
                        local_files_only: bool = False, **overrides) -> "MGVQTokenizer":
        """Load from a save_pretrained folder or a Hugging Face hub id holding one; returned in eval mode."""
        path = resolve_folder(path, "tokenizer", ["config.json", "model.safetensors", "metrics.json"],
                              revision=revision, cache_dir=cache_dir, token=token, force_download=force_download,
                              local_files_only=local_files_only)
        for name in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"tokenizer folder {path}: {name} not found (expected config.json + "
                                        f"model.safetensors, written by save_pretrained)")
        cfg = TokenizerConfig.from_dict(apply_overrides(read_json(os.path.join(path, "config.json")), overrides))
        model = cls(cfg)
        model.load_state_dict(load_safetensors(os.path.join(path, "model.safetensors"), device=str(device)))
        if os.path.isfile(os.path.join(path, "metrics.json")):
            model.metrics = read_json(os.path.join(path, "metrics.json"))
        return model.to(device).eval()

    def _card(self, repo_id: str) -> dict:  # facts for the generated model card (runtime.hub.render_card)
        c = self.config
        vq = getattr(c, "quantizer", "vq") == "vq"
        return dict(title="MGVQ tokenizer", tags=["image-tokenizer"], summary="Stage one: images -> G sub-tokens per "
                    "position (one per sub-codebook of K codes) -> images.", facts={
                        "backbone": c.backbone, "bottleneck": getattr(c, "quantizer", "vq"),
                        "layout G x K": f"{c.groups} x {c.codebook_size}" if vq else None,
                        "latent channels C": c.latent_dim, "sub-token dim C/G": c.latent_dim // c.groups if vq else None,
                        "downsample": c.downsample, "parameters": f"{self.num_parameters() / 1e6:.2f} M"},
                    usage=f"from tokenizer import MGVQTokenizer\n\ntok = MGVQTokenizer.from_pretrained({repo_id!r})\n"
                          "codes = tok.encode(images)            # (B, 3, H, W) in [-1, 1] -> (B, h, w, G)\n"
                          "recon = tok.decode(codes)             # groups_to_use=k decodes from the first k groups")


# ---- presets ---------------------------------------------------------------------------------------------------------
_F16 = [1, 1, 2, 2, 4]
_F8 = [1, 2, 2, 4]


def _mgvq(ch_mult, groups, codebook_size):
    return dict(backbone="vqgan", vqgan=dict(ch=128, ch_mult=ch_mult, num_res_blocks=2, z_channels=256),
                latent_dim=32, groups=groups, codebook_size=codebook_size, nested_keep_probs="default",
                dead_code_reinit=True, image_size=256)


def _llamagen(ch_mult):
    return dict(backbone="vqgan", vqgan=dict(ch=128, ch_mult=ch_mult, num_res_blocks=2, z_channels=256),
                latent_dim=8, groups=1, codebook_size=16384, nested_keep_probs=None, dead_code_reinit=False,
                image_size=256)


PRESETS: dict[str, dict[str, Any]] = {
    # MGVQ (paper) codebook / group settings on the LlamaGen VQGAN backbone (trainable here)
    "mgvq-f16-g4": _mgvq(_F16, 4, 8192),
    "mgvq-f16-g8": _mgvq(_F16, 8, 2048),
    "mgvq-f8-g4": _mgvq(_F8, 4, 8192),
    "mgvq-f8-g8": _mgvq(_F8, 8, 2048),
    # LlamaGen VQ-16 / VQ-8 (71.88M / 70.11M); `mgvq convert --from llamagen-vq` loads their weights
    "llamagen-vq16": _llamagen(_F16),
    "llamagen-vq8": _llamagen(_F8),
    # tiny f4 model for 32x32 images (8x8 grid of 4 sub-tokens); trains on a CPU (the demo's tokenizer)
    # 0.81M params. Adam lr 1e-3 (one-cycle), batch 32, L2 + codebook losses, nested masking + re-init on: PSNR on
    # 32x32 Fashion-MNIST test = 22.5 / 23.9 / 25.3 / 25.6 dB after 500 / 1000 / 1500 / 2000 steps, usage 100%.
    "mgvq-tiny": dict(backbone="vqgan", vqgan=dict(ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, z_channels=64,
                                                   norm_groups=8),
                      latent_dim=32, groups=4, codebook_size=256, nested_keep_probs="default", dead_code_reinit=True,
                      usage_window=8192, image_size=32),
}


def all_presets() -> dict[str, dict[str, Any]]:
    """PRESETS plus the released-MGVQ presets of tokenizer.dcae (if that module is present)."""
    presets = dict(PRESETS)
    try:
        presets.update(getattr(_dcae_module(), "RELEASED_PRESETS", {}))
    except ModuleNotFoundError as e:
        if e.name != "tokenizer.dcae":
            raise
    return presets


def preset_config(name: str, **overrides) -> TokenizerConfig:
    presets = PRESETS if name in PRESETS else all_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown tokenizer preset {name!r}.{hint} Valid presets: {', '.join(sorted(presets))}")
    return TokenizerConfig.from_dict(apply_overrides(presets[name], overrides))
