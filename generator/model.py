"""Class-conditional GPT for stage two: LlamaGen's c2i Transformer with G sub-tokens per image position.

One position of the h x w token grid carries G sub-tokens (one per sub-codebook of K codes).
Input  "sum":       sum of G learned per-group embedding tables (G=1: LlamaGen's `tok_embeddings`).
       "projector": MGVQ's frozen raw tokenizer code vectors, concatenated over groups -> MLP -> LayerNorm.
Output "parallel":  G linear heads on the hidden state (G=1: LlamaGen's `output`).
       "ar":        MGVQ's small causal transformer over the G sub-tokens of one position (the "AR head").

Sequence layout (teacher forcing): [class token, pos 0, ..., pos L-2] -> predicts [pos 0, ..., pos L-1].
Conditioning "text" (LlamaGen t2i): the prefix is T caption-feature tokens (left-padded, a padding mask; projected by
`cls_embedding.cap_proj`, dropped to the null caption `cls_embedding.uncond_embedding` in training) instead of the
one class token; position T-1 predicts pos 0, caption positions get zero RoPE rows like the class token.
State-dict key names follow the reference code (LlamaGen `gpt.py`, MGVQ `gpt_emb_simple.py` / `ar_head.py`),
so the converters only unwrap, drop unused keys and infer the config.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runtime.hub import MGVQHubMixin, load_safetensors, read_json, resolve_folder


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # GQA; None = n_head
    multiple_of: int = 256  # SwiGLU hidden rounded up to this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_prob: float = 0.1  # label dropout in training (for CFG); null class = num_classes
    num_classes: int = 1000
    grid: int = 16  # h = w tokens per side; L = grid * grid positions
    groups: int = 1  # G sub-tokens per position
    codebook_size: int = 16384  # K codes per sub-codebook
    input_mode: str = "sum"  # "sum" | "projector"
    codebook_embed_dim: int = 32  # C = G * (code dim); used by "projector"
    head: str = "parallel"  # "parallel" | "ar"
    ar_head_layers: int = 2
    grad_checkpointing: bool = False
    conditioning: str = "class"  # "class" (one class token) | "text" (caption_tokens caption-feature tokens)
    caption_dim: int = 2048  # text: width of the caption features (FLAN-T5-XL: 2048)
    caption_tokens: int = 120  # text: T caption positions, left-padded (LlamaGen: 120)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("dim", "n_layer", "n_head", "num_classes", "grid", "groups", "codebook_size", "ar_head_layers"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be a positive integer")
        if self.conditioning not in ("class", "text"):
            bad("conditioning", "valid: 'class', 'text'")
        if self.conditioning == "text" and min(int(self.caption_dim), int(self.caption_tokens)) < 1:
            bad("caption_dim" if int(self.caption_dim) < 1 else "caption_tokens", "must be a positive integer")
        if self.input_mode not in ("sum", "projector"):
            bad("input_mode", "valid: 'sum', 'projector'")
        if self.head not in ("parallel", "ar"):
            bad("head", "valid: 'parallel', 'ar'")
        if self.dim % self.n_head:
            bad("dim", f"must be divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            bad("n_head", f"head_dim = dim / n_head = {self.head_dim} must be divisible by 4 for the 2D RoPE")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            bad("n_kv_head", f"must divide n_head={self.n_head}")
        if self.input_mode == "projector":
            if self.codebook_embed_dim % self.groups or self.codebook_embed_dim < 1:
                bad("codebook_embed_dim", f"must be a positive multiple of groups={self.groups}")
            if self.dim % 2:
                bad("dim", "must be even for the projector (hidden dim / 2)")
        if self.head == "ar" and self.dim % self.groups:
            bad("dim", f"must be divisible by groups={self.groups} (the AR head has one attention head per group)")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "class_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def block_size(self) -> int:  # L
        return self.grid * self.grid

    @property
    def prefix_len(self) -> int:  # P condition positions before the image: 1 class token or T caption tokens
        return self.caption_tokens if self.conditioning == "text" else 1

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32, cast back, then the weight (LlamaGen); F.rms_norm: one fused kernel
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):  # SwiGLU, no biases
    def __init__(self, dim: int, hidden: int, dropout_p: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static cache for one attention layer; allocated per generate() call (non-persistent buffers)."""

    def __init__(self, batch: int, n_head: int, seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))
        self.register_buffer("mask", mask, persistent=False)

    def update(self, input_pos, k, v, length: int | None = None):  # input_pos (T,), k/v (B, H, T, hd)
        """Write k/v at input_pos; return keys, values and the boolean attention mask (or None) to use.

        length=None: static shapes for a compiled step: the whole cache + a mask row per query (1, 1, T, S).
        length=n (the caller knows the positions are n-T .. n-1): only the filled prefix (B, H, n, hd), mask None
        for one query (fewer keys, no mask: about 3x faster attention on the CPU)."""
        if length is None:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
            return self.k_cache, self.v_cache, self.mask[input_pos][None, None]
        T = k.shape[2]
        self.k_cache[:, :, length - T:length] = k
        self.v_cache[:, :, length - T:length] = v
        mask = None if T == 1 else self.mask[length - T:length, :length][None, None]
        return self.k_cache[:, :, :length], self.v_cache[:, :, :length], mask


def precompute_freqs_cis_2d(grid: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1):
    """LlamaGen's 2D RoPE table (cls_token_num + grid*grid, head_dim/2, 2) of (cos, sin).

    Rotation pairs (x[2k], x[2k+1]); the first head_dim/4 pairs rotate by the row index, the rest by the
    column index. The class-token rows are ZERO (cos = sin = 0), exactly as LlamaGen: its q and k become 0.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (hd/4,)
    t = torch.arange(grid, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (grid, hd/4)
    freqs_grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid, -1), freqs[None, :, :].expand(grid, -1, -1)], dim=-1
    )  # (grid, grid, hd/2)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)  # (L, hd/2, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])  # (1 + L, hd/2, 2)


def apply_rotary_emb(x, freqs_cis):  # x (B, T, H, hd), freqs_cis (T, hd/2, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    if not torch.compiler.is_compiling():  # eager: one complex multiply (same float ops, bitwise equal, fewer kernels)
        fc = torch.view_as_complex(freqs_cis.float().contiguous()).view(1, xs.size(1), 1, xs.size(3))
        return torch.view_as_real(torch.view_as_complex(xs) * fc).flatten(3).type_as(x)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1], xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs_cis, input_pos=None, kv_len=None, attn_mask=None):  # x (B, T, D)
        B, T, D = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([D, kv, kv], dim=-1)
        q = apply_rotary_emb(q.view(B, T, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(B, T, self.n_kv_head, self.head_dim), freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if self.kv_cache is not None and input_pos is not None:
            k, v, mask = self.kv_cache.update(input_pos, k, v, kv_len)  # (B, Hkv, S, hd), (1, 1, T, S) | None
            causal = False
        if attn_mask is not None:  # per-sample bool (B, 1, T, S), True = may attend (caption padding): replaces both
            mask, causal = attn_mask, False
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.attn_dropout_p if self.training else 0.0
        )  # (B, H, T, hd)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, D)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden, cfg.ffn_dropout_p)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # activation checkpointing of this block in training (set by generator.perf.optimize_for_training):
        # None = off (or GPTConfig.grad_checkpointing, applied by GPT.backbone), else extra keyword arguments of
        # torch.utils.checkpoint.checkpoint ({} = recompute the whole block; context_fn = selective). Applied
        # inside forward, so a regional torch.compile of the block compiles the checkpointed region too.
        self.activation_checkpointing: dict | None = None

    def forward(self, x, freqs_cis, input_pos=None, kv_len=None, attn_mask=None):
        ac = self.activation_checkpointing
        if ac is not None and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, freqs_cis, input_pos, kv_len, attn_mask, use_reentrant=False, **ac)
        return self._forward(x, freqs_cis, input_pos, kv_len, attn_mask)

    def _forward(self, x, freqs_cis, input_pos=None, kv_len=None, attn_mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, kv_len, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index num_classes) and label dropout in training (LlamaGen)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels, train: bool):  # (B,) -> (B, 1, D)
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):  # LlamaGen's MLP: fc1 -> GELU(tanh) -> fc2, no biases
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features (B, T, caption_dim) -> (B, T, D) (LlamaGen's t2i CaptionEmbedder).

    The null caption `uncond_embedding` (T, caption_dim) is a fixed random buffer, as in LlamaGen (in the state dict,
    not a parameter; the projection that follows it is learned). In training a caption is replaced by it with
    probability dropout_prob; its padding mask stays the caption's (LlamaGen), which is also how CFG uses it."""

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, tokens: int):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(tokens, caption_dim) / caption_dim ** 0.5)

    def forward(self, caption, train: bool):
        if train and self.dropout_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


# --------------------------------------------------------------------------------------------------------- AR head


class ARAttention(nn.Module):  # MGVQ ar_head.py: separate q/k/v/proj, QK-RMSNorm per head, causal
    def __init__(self, dim: int, n_head: int, eps: float):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.key = nn.Linear(dim, dim, bias=False)
        self.query = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, input_pos=None, kv_len=None):  # x (N, T, D)
        N, T, D = x.shape
        q = self.q_norm(self.query(x).view(N, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.key(x).view(N, T, self.n_head, self.head_dim)).transpose(1, 2)
        v = self.value(x).view(N, T, self.n_head, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if self.kv_cache is not None and input_pos is not None:
            k, v, mask = self.kv_cache.update(input_pos, k, v, kv_len)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (N, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(N, T, D))


class ImageCausalBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = ARAttention(dim, n_head, eps)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, 4 * dim)

    def forward(self, x, input_pos=None, kv_len=None):
        x = x + self.attention(self.attention_norm(x), input_pos, kv_len)
        return x + self.feed_forward(self.ffn_norm(x))


class ARHead(nn.Module):
    """Causal transformer over one position's sequence [h, SOS, E(g_0), ..., E(g_{G-2})] + pos_emb[:G+1].

    Output j+1 predicts sub-token g_j. The token embedding and output head are shared by all groups
    (local indices); the learned position embedding is what tells the groups apart.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        D, G = cfg.dim, cfg.groups
        self.groups = G
        self.tok_emb = nn.Embedding(cfg.codebook_size, D)
        # (1, L, D) as in MGVQ (only the first G+1 rows are used); at least G+1 rows for tiny grids.
        self.pos_emb = nn.Parameter(torch.zeros(1, max(cfg.block_size, G + 1), D))
        self.sos_emb_for_image = nn.Parameter(torch.zeros(1, 1, D))
        self.causal_space_blocks = nn.ModuleList(
            ImageCausalBlock(D, G, cfg.norm_eps) for _ in range(cfg.ar_head_layers)
        )
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.codebook_size, bias=False)

    def _run(self, x, input_pos=None, kv_len=None):  # (N, T, D) -> logits (N, T, K)
        for blk in self.causal_space_blocks:
            x = blk(x, input_pos, kv_len)
        return self.head(self.ln_f(x))

    def forward(self, h, codes):  # teacher forcing: h (N, D), codes (N, G) -> logits (N, G, K)
        N, G = codes.shape
        x = torch.cat(
            [h[:, None], self.sos_emb_for_image.expand(N, -1, -1), self.tok_emb(codes[:, : G - 1])], dim=1
        )  # (N, G+1, D)
        return self._run(x + self.pos_emb[:, : G + 1])[:, 1:]

    # -- cached sampling: prefill [h, SOS] at positions 0,1, then one sub-token per step at position g+1
    def setup_cache(self, batch: int, dtype, device):
        for blk in self.causal_space_blocks:
            a = blk.attention
            a.kv_cache = KVCache(batch, a.n_head, self.groups + 1, a.head_dim, dtype, device)

    # kv_len: None (static shapes, masked cache) or the number of filled slots after this step (eager)
    def prefill(self, h, input_pos, kv_len=None):  # h (N, D), input_pos = arange(2) -> logits for g_0 (N, K)
        x = torch.cat([h[:, None], self.sos_emb_for_image.expand(h.shape[0], -1, -1)], dim=1)  # (N, 2, D)
        return self._run(x + self.pos_emb[:, :2], input_pos, kv_len)[:, -1]

    def decode(self, prev, input_pos, kv_len=None):  # prev (N,) sub-token g-1, input_pos = [g] -> logits (N, K)
        x = self.tok_emb(prev)[:, None] + self.pos_emb[:, input_pos]  # (N, 1, D)
        return self._run(x, input_pos, kv_len)[:, -1]


# ----------------------------------------------------------------------------------------------------------- model


class GPT(nn.Module, MGVQHubMixin, tags=["class-conditional", "autoregressive"]):
    def __init__(self, config: GPTConfig, codebook: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg = config
        G, K, D = cfg.groups, cfg.codebook_size, cfg.dim
        if cfg.conditioning == "text":  # class_dropout_prob = the caption-dropout probability
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, D, cfg.class_dropout_prob, cfg.caption_tokens)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        if cfg.input_mode == "sum":
            # G per-group tables stored as one (G*K, D) table, row g*K + k; summed over groups
            self.tok_embeddings = nn.Embedding(G * K, D)
        else:
            self.register_buffer("codebook", self._check_codebook(codebook), persistent=True)  # (G*K, C/G), frozen
            C = cfg.codebook_embed_dim
            self.img_projector = nn.Sequential(
                nn.Linear(C, D // 2, bias=False), nn.GELU(), nn.Linear(D // 2, D, bias=False), nn.LayerNorm(D)
            )
        self.register_buffer("group_offsets", torch.arange(G) * K, persistent=False)  # (G,)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(D, cfg.norm_eps)
        if cfg.head == "parallel":
            self.output = nn.Linear(D, G * K, bias=False)  # G heads in one matmul; G=1: LlamaGen's output
        else:
            self.ar_head = ARHead(cfg)
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis_2d(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.prefix_len),
            persistent=False,
        )  # (P + L, hd/2, 2)
        self.apply(self._init_weights)
        if cfg.head == "parallel":
            nn.init.zeros_(self.output.weight)  # LlamaGen zero-inits the output head
        else:
            nn.init.normal_(self.ar_head.sos_emb_for_image, std=cfg.initializer_range)

    def _check_codebook(self, codebook):
        cfg = self.config
        G, K, c = cfg.groups, cfg.codebook_size, cfg.codebook_embed_dim // cfg.groups
        if codebook is None:
            if torch.empty(0).device.type == "meta":
                return torch.empty(G * K, c)
            raise ValueError(
                f"input_mode='projector' needs the frozen tokenizer codebook: pass codebook= a tensor of shape "
                f"(G*K, C/G) = ({G * K}, {c}) or (G, K, C/G) = ({G}, {K}, {c}) (raw, unnormalised code vectors)"
            )
        codebook = codebook.detach()
        if codebook.dim() == 3:
            codebook = codebook.reshape(-1, codebook.shape[-1])
        if tuple(codebook.shape) != (G * K, c):
            raise ValueError(
                f"codebook has shape {tuple(codebook.shape)}; with groups={G}, codebook_size={K}, "
                f"codebook_embed_dim={cfg.codebook_embed_dim} it must be ({G * K}, {c}) or ({G}, {K}, {c})"
            )
        return codebook.float().clone()

    def _apply(self, fn, recurse=True):
        # keep the RoPE table in float32 under model.to(bf16/fp16) (LlamaGen keeps it out of the module's dtype)
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32:
            cfg = self.config
            table = precompute_freqs_cis_2d(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.prefix_len)
            self.freqs_cis = table.to(self.freqs_cis.device) if self.freqs_cis.device.type != "meta" else \
                torch.empty(table.shape, device="meta")
        return self

    def _init_weights(self, m):
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    # -- pieces (also used by generate.py)
    def embed_class(self, labels):  # (B,) -> (B, 1, D)
        return self.cls_embedding(labels, train=self.training)

    def embed_caption(self, feats):  # checked caption features (B, T, caption_dim) -> (B, T, D)
        return self.cls_embedding(feats.to(self.cls_embedding.cap_proj.fc1.weight.dtype), train=self.training)

    def prepare_caption(self, cond, cond_mask=None):
        """Check caption features (B, T', caption_dim) and their mask (B, T') (bool or 0/1; None = all valid);
        left-pad T' < T = caption_tokens with zero rows. Returns float features (B, T, C) and a bool mask (B, T).
        Captions must be left-padded (the valid tokens last), as LlamaGen: the last caption position predicts the
        first image token, so it must be valid."""
        cfg = self.config
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.dim() != 3 \
                or cond.shape[-1] != cfg.caption_dim:
            what = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"a text-conditional GPT takes caption features (B, T, caption_dim={cfg.caption_dim}) "
                             f"float, T <= caption_tokens={cfg.caption_tokens}; got {what}")
        B, T = cond.shape[:2]
        if T > cfg.caption_tokens or T < 1:
            raise ValueError(f"caption features have {T} tokens; this GPT takes 1..caption_tokens="
                             f"{cfg.caption_tokens} (left-padded)")
        mask = torch.ones(B, T, dtype=torch.bool, device=cond.device) if cond_mask is None else \
            torch.as_tensor(cond_mask, device=cond.device).bool()
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"cond_mask has shape {tuple(mask.shape)}; the caption features need (B, T) = {(B, T)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("cond_mask: the last caption position must be valid in every row (captions are "
                             "left-padded: padding first, the valid tokens last)")
        pad = cfg.caption_tokens - T
        if pad:
            cond = F.pad(cond, (0, 0, pad, 0))
            mask = F.pad(mask, (pad, 0), value=False)
        return cond, mask

    def null_caption(self, batch: int):  # (B, T, caption_dim): the CFG / dropout caption
        return self.cls_embedding.uncond_embedding[None].expand(batch, -1, -1)

    def caption_attn_mask(self, cond_mask, seq_len: int):
        """(B, 1, S, S) bool, True = may attend: causal, caption columns only where valid, each row itself (LlamaGen's
        dataset/t2i.py mask: a padded caption row is never empty; nothing else reads it)."""
        T, dev = cond_mask.shape[1], cond_mask.device
        keys = torch.cat([cond_mask, cond_mask.new_ones(cond_mask.shape[0], seq_len - T)], 1)  # (B, S)
        causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev))
        eye = torch.eye(seq_len, dtype=torch.bool, device=dev)
        return ((causal & keys[:, None, :]) | eye)[:, None]

    def embed_cond(self, cond, cond_mask=None, seq_len: int | None = None):
        """Prefix embeddings (B, P, D) and the attention mask over seq_len positions (None = plain causal)."""
        if self.config.conditioning == "class":
            if cond_mask is not None:
                raise ValueError("cond_mask is for text-conditional GPTs (conditioning='text'); this one takes class "
                                 "labels")
            return self.embed_class(cond), None
        explicit = cond_mask is not None
        feats, mask = self.prepare_caption(cond, cond_mask)
        x = self.embed_caption(feats)
        padded = explicit or feats.shape[1] != cond.shape[1]
        return x, (self.caption_attn_mask(mask, seq_len) if padded and seq_len else None)

    def embed_codes(self, codes):  # (B, T, G) -> (B, T, D)
        idx = codes.long() + self.group_offsets
        if self.config.input_mode == "sum":
            return self.tok_embeddings(idx).sum(-2)
        vecs = self.codebook[idx]  # (B, T, G, C/G) raw code vectors
        return self.img_projector(vecs.flatten(-2).to(self.img_projector[0].weight.dtype))

    def backbone(self, x, input_pos=None, kv_len=None, attn_mask=None):  # (B, T, D) embeddings -> hidden (B, T, D)
        """input_pos (T,): positions in the KV cache (generate); kv_len: see KVCache.update; attn_mask: per-sample
        bool (B, 1, T, S) (caption padding), None = causal."""
        freqs = self.freqs_cis[: x.shape[1]] if input_pos is None else self.freqs_cis[input_pos]
        h = self.tok_dropout(x)
        for layer in self.layers:
            if self.config.grad_checkpointing and self.training and layer.activation_checkpointing is None:
                h = checkpoint(layer, h, freqs, input_pos, kv_len, attn_mask, use_reentrant=False)
            else:
                h = layer(h, freqs, input_pos, kv_len, attn_mask)
        return self.norm(h)

    def _flat_codes(self, codes):
        cfg = self.config
        if codes.dim() == 4:
            codes = codes.flatten(1, 2)
        if codes.dim() != 3 or codes.shape[-1] != cfg.groups:
            raise ValueError(
                f"codes must be (B, h, w, G) or (B, L, G) with G={cfg.groups}; got shape {tuple(codes.shape)}"
            )
        if codes.shape[1] > cfg.block_size:
            raise ValueError(f"codes have {codes.shape[1]} positions; the model's grid={cfg.grid} allows "
                             f"L={cfg.block_size}")
        return codes

    def backbone_features(self, codes, cond, cond_mask=None):  # (B, L, G), cond -> (B, L, D) at image positions
        codes = self._flat_codes(codes)
        P = self.config.prefix_len
        prefix, mask = self.embed_cond(cond, cond_mask, P + codes.shape[1] - 1)
        x = torch.cat([prefix, self.embed_codes(codes[:, :-1])], dim=1)
        return self.backbone(x, attn_mask=mask)[:, P - 1:]

    def head_logits(self, h, codes):  # h (B, T, D), codes (B, T, G) -> (B, T, G, K)
        B, T, _ = h.shape
        if self.config.head == "parallel":
            return self.output(h).view(B, T, self.config.groups, self.config.codebook_size)
        return self.ar_head(h.reshape(B * T, -1), codes.reshape(B * T, -1)).view(B, T, self.config.groups, -1)

    def forward(self, codes, cond, cond_mask=None):
        """Teacher-forced logits (B, L, G, K) float32: position t from the condition and positions < t;
        with the "ar" head also from the sub-tokens < g of position t.

        cond: class labels (B,), or for conditioning="text" caption features (B, T, caption_dim), left-padded, with
        cond_mask (B, T) bool, True where a caption token is valid (None = all valid)."""
        codes = self._flat_codes(codes)
        h = self.backbone_features(codes, cond, cond_mask)
        return self.head_logits(h, codes).float()

    def compute_loss(self, codes, cond, cond_mask=None) -> dict:
        codes = self._flat_codes(codes)
        logits = self(codes, cond, cond_mask)  # (B, L, G, K)
        K = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, K), codes.reshape(-1).long(), reduction="none")
        ce = ce.view(codes.shape)  # (B, L, G)
        return dict(loss=ce.mean(), group_losses=ce.mean(dim=(0, 1)))

    # -- KV caches for generate()
    def setup_caches(self, batch: int, dtype=None, device=None):
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        seq = find_multiple(self.config.block_size + self.config.prefix_len, 8)
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(batch, a.n_kv_head, seq, a.head_dim, dtype, device)
        if self.config.head == "ar":
            self.ar_head.setup_cache(batch, dtype, device)

    def clear_caches(self):
        for m in self.modules():
            if isinstance(m, (Attention, ARAttention)):
                m.kv_cache = None

    # -- I/O
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups (LlamaGen, nanoGPT): decay on >= 2-D parameters (matrices, embeddings), none on norms/biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per image token: 6 x matmul parameters it passes through + attention
        (PaLM's estimate; for MFU). The AR head runs on G + 1 sub-tokens per position."""
        c, L = self.config, self.config.block_size
        numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        dense = numel(self.layers) + numel(self.norm)
        if c.input_mode == "projector":
            dense += numel(self.img_projector)
        flops = 6 * dense + 12 * c.n_layer * c.dim * L  # attention: QK^T and AV over L keys
        if c.head == "parallel":
            flops += 6 * numel(self.output)
        else:
            h, T = self.ar_head, c.groups + 1
            head_dense = numel(h.causal_space_blocks) + numel(h.ln_f) + numel(h.head)
            flops += 6 * head_dense * T + 12 * c.ar_head_layers * c.dim * T * T
        return float(flops)

    # save_pretrained(dir, metrics=None) / push_to_hub(repo_id): runtime.hub.MGVQHubMixin (+ a model card README.md)
    def _save_pretrained(self, out_dir):
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(out_dir, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype: torch.dtype | None = None, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None, force_download: bool = False,
                        local_files_only: bool = False, **overrides) -> "GPT":
        """Load a folder written by save_pretrained, or a hub id holding one. `overrides` may change non-shape fields
        (e.g. dropouts)."""
        path = resolve_folder(path, "GPT", ["config.json", "model.safetensors", "metrics.json"], revision=revision,
                              cache_dir=cache_dir, token=token, force_download=force_download,
                              local_files_only=local_files_only)
        cfg_file, w_file = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
        for f in (cfg_file, w_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"GPT.from_pretrained: {f} not found (expected config.json + model.safetensors)")
        cfg = GPTConfig.from_dict({**read_json(cfg_file), **overrides})
        sd = load_safetensors(w_file, device=str(device))
        model = cls(cfg, codebook=sd.get("codebook")).to(device)
        model.load_state_dict(sd, strict=True)
        if os.path.isfile(os.path.join(path, "metrics.json")):
            model.metrics = read_json(os.path.join(path, "metrics.json"))
        return model.to(dtype) if dtype is not None else model

    def _card(self, repo_id: str) -> dict:  # facts for the generated model card (runtime.hub.render_card)
        c = self.config
        if c.conditioning == "text":
            return dict(title="MGVQ text-conditional GPT", tags=["text-to-image"], summary="Stage two: a LlamaGen t2i "
                        "transformer (caption-feature prefix) predicting G sub-tokens per image position.",
                        facts={"layers x heads x dim": f"{c.n_layer} x {c.n_head} x {c.dim}",
                               "parameters": f"{self.num_parameters() / 1e6:.2f} M",
                               "caption tokens x dim": f"{c.caption_tokens} x {c.caption_dim}",
                               "token grid": f"{c.grid} x {c.grid}", "layout G x K": f"{c.groups} x {c.codebook_size}",
                               "input / head": f"{c.input_mode} / {c.head}"},
                        usage=f"from generator import GPT, generate\n\ngpt = GPT.from_pretrained({repo_id!r})\n"
                              "codes = generate(gpt, feats, cond_mask=mask, guidance_scale=4.0)  # T5 features, "
                              "left-padded")
        return dict(title="MGVQ class-conditional GPT", tags=["class-conditional"], summary="Stage two: a LlamaGen "
                    "c2i transformer predicting G sub-tokens per image position (decode with the matching tokenizer).",
                    facts={"layers x heads x dim": f"{c.n_layer} x {c.n_head} x {c.dim}",
                           "parameters": f"{self.num_parameters() / 1e6:.2f} M", "classes": c.num_classes,
                           "token grid": f"{c.grid} x {c.grid}", "layout G x K": f"{c.groups} x {c.codebook_size}",
                           "input / head": f"{c.input_mode} / {c.head}"},
                    usage=f"import torch\nfrom generator import GPT, generate\n\ngpt = GPT.from_pretrained({repo_id!r})\n"
                          "codes = generate(gpt, torch.tensor([0, 1]), guidance_scale=4.0)  # (B, h, w, G)")

    @classmethod
    def from_preset(cls, name: str, codebook: torch.Tensor | None = None, **overrides) -> "GPT":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(GPTConfig.from_dict({**PRESETS[name], **overrides}), codebook=codebook)


# ---------------------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {
    "GPT-tiny": dict(n_layer=2, n_head=4, dim=64),  # CPU tests / demo
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}
