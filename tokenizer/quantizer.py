"""Multi-group vector quantizer (MGVQ, paper Sec. 3.2-3.3; released code `mgvq.py:455-591`).

A latent vector of dim C is split into G contiguous sub-vectors of dim D = C/G; sub-vector g is quantized with its own
sub-codebook of K codes. All G*K codes live in ONE `nn.Embedding(G*K, D)` (group g owns rows [g*K, (g+1)*K)), exactly as
the released MGVQ stores them, so its `quantize.embedding.weight` loads unchanged. With G=1 this is LlamaGen's quantizer.

- l2_norm=True: latents and codes are L2-normalised, the nearest code is the max cosine similarity (one batched matmul).
- Straight-through estimator; per-group vq_loss = mean((z_q - sg z)^2), commit = beta * mean((sg z_q - z)^2).
- Usage: `codebook_used (G, window)` ring buffer of the last used indices (-1 = empty) -> per-group usage fraction;
  `embed_prob (G, K)` EMA of code usage; per-group perplexity of the batch.
- Optional CVQ-style dead-code anchor re-init (every training step, as the released code): rarely used codes are pulled
  to batch features sampled near them. Under torch.distributed it all-reduces the usage counts and draws from the union
  of all ranks' features with shared randomness, so the codebook stays identical on every rank.
- codebook_update="ema" (VQ-VAE-2's codebook learning, not in the released code): codes are the exponential moving
  average of the (normalised, when l2_norm) latents assigned to them (decay ema_decay, Laplace-smoothed counts), the
  embedding gets no gradient and vq_loss is 0; only the commitment term trains the encoder. Counts start at 1 and sums
  at the initial codes, so a code nobody picks stays where it is. Under torch.distributed the counts and sums are
  all-reduced. With dead-code re-init the EMA sums follow the re-initialised codes.
- Nested (prefix) masking, training only: one k ~ keep_probs per batch keeps groups [0, k); the trailing sub-tokens are
  zeroed, get no loss and no index. NOTE: the released code only ever masks groups 1..3 (its probability list has length
  4, and is all zeros in the released "second stage" setting); here the schedule covers any G (`default_keep_probs`).
  mask_per="sample" (not in the released code) draws one k per image instead: every batch then trains every prefix,
  and a masked sub-token is zeroed and left out of its group's vq / commit mean; indices keep all G columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


MASK_PER = ("batch", "sample")  # nested masking: one k per batch (released MGVQ) or one k per image
CODEBOOK_UPDATES = ("grad", "ema")  # codebook learnt by the vq loss's gradient (released) or as EMA cluster means


def default_keep_probs(groups: int) -> list[float]:
    """P(keep the first k groups), k = 1..G. G=4 -> [.2, .1, .1, .6] (paper / released comment); in general .2 for
    k=1, .6 for k=G and the remaining .2 spread evenly over k = 2..G-1 (G=2 -> [.2, .8]; G=1 -> [1.0], never masks)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if groups == 1:
        return [1.0]
    if groups == 2:
        return [0.2, 0.8]
    mid = 0.2 / (groups - 2)
    return [0.2] + [mid] * (groups - 2) + [0.6]


def check_keep_probs(keep_probs: Sequence[float], groups: int, name: str = "keep_probs") -> list[float]:
    probs = [float(p) for p in keep_probs]
    if len(probs) != groups:
        raise ValueError(f"{name} must have one probability per k = 1..groups ({groups} values), got {len(probs)}: {probs}")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-3:
        raise ValueError(f"{name} must be non-negative and sum to 1 (within 1e-3), got {probs} (sum {sum(probs):.6f})")
    total = sum(probs)  # hand-written lists like [.2, .0333 x 6, .6] are renormalised (exact ones kept as given)
    return probs if abs(total - 1.0) < 1e-9 else [p / total for p in probs]


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, C, h, w) quantized latent (straight-through), masked groups are zero
    indices: torch.Tensor  # (B, h, w, k) int64, local per group, k = keep_groups
    vq_loss: torch.Tensor  # (G,) masked groups 0
    commit_loss: torch.Tensor  # (G,) masked groups 0
    keep_groups: int
    usage: torch.Tensor  # (G,) fraction of each sub-codebook used in the sliding window
    perplexity: torch.Tensor  # (G,) exp(entropy) of this batch's code histogram, masked groups 0


class MultiGroupQuantizer(nn.Module):
    def __init__(self, dim: int, groups: int = 1, codebook_size: int = 16384, beta: float = 0.25, l2_norm: bool = True,
                 usage_window: int = 65536, dead_code_reinit: bool = False, reinit_decay: float = 0.01,
                 keep_probs: Sequence[float] | None = None, mask_per: str = "batch", codebook_update: str = "grad",
                 ema_decay: float = 0.99):
        super().__init__()
        if codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {codebook_update!r}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if mask_per not in MASK_PER:
            raise ValueError(f"mask_per must be one of {MASK_PER}, got {mask_per!r}")
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups}), groups >= 1")
        if codebook_size < 2:
            raise ValueError(f"codebook_size (codes per group) must be >= 2, got {codebook_size}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        if not 0.0 < reinit_decay < 1.0:
            raise ValueError(f"reinit_decay must be in (0, 1), got {reinit_decay}")
        self.dim, self.groups, self.codebook_size = dim, groups, codebook_size
        self.group_dim = dim // groups
        self.beta, self.l2_norm = beta, l2_norm
        self.dead_code_reinit, self.reinit_decay = dead_code_reinit, reinit_decay
        self.keep_probs = None if keep_probs is None else check_keep_probs(keep_probs, groups)
        self.mask_per = mask_per
        self.codebook_update, self.ema_decay = codebook_update, ema_decay

        n = groups * codebook_size
        self.embedding = nn.Embedding(n, self.group_dim)  # group g owns rows [g*K, (g+1)*K)
        self.embedding.weight.data.uniform_(-1.0 / n, 1.0 / n)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        self.register_buffer("embed_prob", torch.zeros(groups, codebook_size))  # EMA of usage
        if codebook_update == "ema":  # only then: released checkpoints keep their state-dict keys
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(groups, codebook_size))  # (G, K) smoothed cluster sizes
            self.register_buffer("ema_sum", self.embedding.weight.data.clone().view(groups, codebook_size,
                                                                                     self.group_dim))  # (G, K, D)
        self.register_buffer("codebook_used", torch.full((groups, usage_window), -1, dtype=torch.long))
        self.register_buffer("_window_pos", torch.zeros(groups, dtype=torch.long), persistent=False)  # ring position

    # ---- helpers -------------------------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """Raw (un-normalised) code vectors (G, K, D): what the generator's input projector consumes."""
        return self.embedding.weight.view(self.groups, self.codebook_size, self.group_dim)

    def _codes(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = (self.embedding.weight if weight is None else weight).view(self.groups, self.codebook_size, self.group_dim)
        return F.normalize(w, dim=-1) if self.l2_norm else w  # (G, K, D)

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (G, N, D), N = B*h*w in raster order (b, h, w); normalised if l2_norm."""
        B, C, h, w = z.shape
        if C != self.dim:
            raise ValueError(f"quantizer expects {self.dim} latent channels, got input of shape {tuple(z.shape)}")
        zg = z.permute(0, 2, 3, 1).reshape(B * h * w, self.groups, self.group_dim).transpose(0, 1)
        return F.normalize(zg, dim=-1) if self.l2_norm else zg

    def _scores(self, zg: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(k, N, D), (k, K, D) -> (k, N, K) = -||z - e||^2 (as in the reference: -|z|^2 - |e|^2 + 2 z.e)."""
        dots = torch.bmm(zg, codes.transpose(1, 2))  # (k, N, K)
        return 2 * dots - zg.pow(2).sum(-1, keepdim=True) - codes.pow(2).sum(-1).unsqueeze(1)

    @staticmethod
    def _merge(zg: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
        """(G, N, D) -> (B, C, h, w)."""
        return zg.transpose(0, 1).reshape(B, h, w, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w, G) int64 nearest codes; no side effects."""
        B, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            zg = self._split(z.float())
            idx = self._scores(zg, self._codes().float()).argmax(-1)  # (G, N)
        return idx.t().reshape(B, h, w, self.groups)

    def lookup(self, indices: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """(B, h, w, k<=G) local indices -> (B, C, h, w) (normalised) codes; groups >= groups_to_use (and any group
        without an index column) are zero. groups_to_use=None uses every given group."""
        if indices.dim() != 4 or not 1 <= indices.shape[-1] <= self.groups:
            raise ValueError(f"indices must be (B, h, w, k) with 1 <= k <= {self.groups}, got {tuple(indices.shape)}")
        B, h, w, k = indices.shape
        if groups_to_use is not None:
            if not 1 <= groups_to_use <= self.groups:
                raise ValueError(f"groups_to_use must be in [1, {self.groups}] or None, got {groups_to_use}")
            k = min(k, groups_to_use)
        idx = indices[..., :k].reshape(-1, k).long()  # (N, k)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.codebook_size):
            raise ValueError(f"indices must be in [0, {self.codebook_size}), got range [{idx.min()}, {idx.max()}]")
        offsets = torch.arange(k, device=idx.device) * self.codebook_size
        zq = self._codes().reshape(-1, self.group_dim)[idx + offsets]  # (N, k, D)
        if k < self.groups:
            zq = torch.cat([zq, zq.new_zeros(zq.shape[0], self.groups - k, self.group_dim)], dim=1)
        return zq.reshape(B, h, w, self.dim).permute(0, 3, 1, 2)

    def sample_keep_groups(self) -> int:
        if self.keep_probs is None or self.groups == 1:
            return self.groups
        u, cdf = torch.rand(()).item(), 0.0  # one draw per batch (torch RNG, so seeds reproduce it)
        for k, p in enumerate(self.keep_probs, start=1):
            cdf += p
            if u < cdf:
                return k
        return self.groups

    def usage(self) -> torch.Tensor:
        """(G,) fraction of each sub-codebook seen in this process's sliding window."""
        return self._used_mask().float().mean(-1)

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, keep_groups: int | None = None) -> QuantizerOutput:
        """z (B, C, h, w). keep_groups: number of leading groups kept (None: sampled from keep_probs in training,
        all groups otherwise).

        Under torch.distributed, a training forward runs collectives (usage all-reduce, re-init exchange, broadcast of
        the sampled k), so every rank must call it in step, and an explicit keep_groups must agree across ranks."""
        with torch.autocast(z.device.type, enabled=False):  # nearest-code search and losses in fp32
            return self._forward(z.float(), keep_groups)

    def _forward(self, z: torch.Tensor, keep_groups: int | None) -> QuantizerOutput:
        B, _, h, w = z.shape
        G, K, D = self.groups, self.codebook_size, self.group_dim
        distributed = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if keep_groups is None:
            keep_groups = self.sample_keep_groups() if self.training else G
            if distributed and self.keep_probs is not None:  # one k for the global batch (collective shapes agree)
                kt = torch.tensor([keep_groups], device=z.device)
                dist.broadcast(kt, src=0)
                keep_groups = int(kt.item())
        if not 1 <= keep_groups <= G:
            raise ValueError(f"keep_groups must be in [1, {G}], got {keep_groups}")
        k = keep_groups
        sample_mask = None  # (G, N) float: 1 where image b's sub-token g is kept (mask_per="sample" in training)
        if self.training and self.mask_per == "sample" and self.keep_probs is not None and k == G and G > 1:
            kb = torch.multinomial(torch.tensor(self.keep_probs), B, replacement=True).to(z.device) + 1  # (B,)
            kept = torch.arange(G, device=z.device)[:, None] < kb[None]  # (G, B)
            sample_mask = kept[:, :, None].expand(G, B, h * w).reshape(G, B * h * w).float()
        reinit = self.training and self.dead_code_reinit
        ema = self.training and self.codebook_update == "ema"
        weight = self.embedding.weight
        if reinit or ema:  # re-init / EMA write the weight in place after this forward; keep autograd's copy intact
            weight = weight.clone()

        zg = self._split(z)[:k]  # (k, N, D)
        codes = self._codes(weight)[:k]  # (k, K, D)
        scores = self._scores(zg.detach(), codes.detach())  # (k, N, K)
        idx = scores.argmax(-1)  # (k, N)
        zq = torch.gather(codes, 1, idx.unsqueeze(-1).expand(-1, -1, D))  # (k, N, D)

        if ema:  # the codes are not trained by a loss: keep only the commitment term
            zq = zq.detach()
        if sample_mask is None:
            vq = (zq - zg.detach()).pow(2).mean(dim=(1, 2))  # (k,)
            commit = self.beta * (zq.detach() - zg).pow(2).mean(dim=(1, 2))  # (k,)
            zq = zg + (zq - zg).detach()  # straight-through
        else:  # per-group means over the kept sub-tokens only; masked ones are zeroed after the straight-through
            n_kept = (sample_mask.sum(1) * D).clamp_min(1)  # (G,)
            vq = ((zq - zg.detach()).pow(2).sum(-1) * sample_mask).sum(1) / n_kept
            commit = self.beta * ((zq.detach() - zg).pow(2).sum(-1) * sample_mask).sum(1) / n_kept
            zq = (zg + (zq - zg).detach()) * sample_mask[..., None]
        if k < G:
            zq = torch.cat([zq, zq.new_zeros(G - k, zq.shape[1], D)], dim=0)
            vq = torch.cat([vq, vq.new_zeros(G - k)])
            commit = torch.cat([commit, commit.new_zeros(G - k)])

        with torch.no_grad():
            counts = torch.zeros(k, K, device=z.device, dtype=torch.float32)
            counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))  # (k, K)
            if distributed:
                dist.all_reduce(counts)
            p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum(-1))
            perplexity = torch.cat([perplexity, perplexity.new_zeros(G - k)])
            if self.training:
                self._push_used(idx)
                if ema:
                    self._ema_update(zg.detach(), idx, None if sample_mask is None else sample_mask[:k], distributed)
                if reinit:  # never copy non-finite features into the codebook (the step will be skipped anyway)
                    finite = torch.isfinite(zg).all().float()
                    if distributed:  # every rank must agree: _reinit runs collectives
                        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                    if finite.item() == 1.0:
                        self._reinit(zg.detach(), scores, p, distributed)
                        if ema:  # the EMA sums follow the re-initialised codes (cluster sizes kept)
                            self.ema_sum[:k] = self.codebook()[:k] * self._ema_cluster()[:k, :, None]
            used = self._used_mask().float()  # (G, K)
            if distributed:  # every rank reports the union of the ranks' windows
                dist.all_reduce(used, op=dist.ReduceOp.MAX)
            usage = used.mean(-1)

        if ema:
            vq = torch.zeros_like(vq)  # reported as 0: the codebook has no loss of its own
        indices = idx.t().reshape(B, h, w, k)
        return QuantizerOutput(self._merge(zq, B, h, w), indices, vq, commit, k, usage, perplexity)

    def _ema_cluster(self) -> torch.Tensor:
        """(G, K) Laplace-smoothed cluster sizes (sum preserved), so that no code divides by ~0."""
        n = self.ema_count.sum(-1, keepdim=True)
        return (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n

    def _ema_update(self, zg: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None, distributed: bool) -> None:
        """codes of the first k groups <- EMA of the features assigned to them. zg (k, N, D), idx (k, N), mask (k, N)
        (1 where a sub-token is kept, mask_per="sample") or None."""
        k, N, D = zg.shape
        w = torch.ones_like(idx, dtype=zg.dtype) if mask is None else mask.to(zg.dtype)  # (k, N)
        counts = torch.zeros(k, self.codebook_size, device=zg.device, dtype=zg.dtype).scatter_add_(1, idx, w)
        sums = torch.zeros(k, self.codebook_size, D, device=zg.device, dtype=zg.dtype).scatter_add_(
            1, idx[..., None].expand(-1, -1, D), zg * w[..., None])  # (k, K, D)
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count[:k].lerp_(counts, 1 - self.ema_decay)
        self.ema_sum[:k].lerp_(sums, 1 - self.ema_decay)
        codes = self.ema_sum[:k] / self._ema_cluster()[:k, :, None]  # (k, K, D)
        self.embedding.weight.data.view(self.groups, self.codebook_size, D)[:k] = codes

    def _used_mask(self) -> torch.Tensor:
        """(G, K) bool: code seen in the sliding window."""
        hits = torch.zeros(self.groups, self.codebook_size + 1, device=self.codebook_used.device)
        hits.scatter_(1, self.codebook_used + 1, 1.0)  # column 0 collects the empty (-1) slots
        return hits[:, 1:] > 0

    def _push_used(self, idx: torch.Tensor) -> None:
        """Write this batch's indices (k, N) into the first k groups' sliding windows (ring buffers)."""
        k, n = idx.shape
        window = self.codebook_used.shape[1]
        if n > window:
            idx, n = idx[:, -window:], window
        cols = (self._window_pos[:k, None] + torch.arange(n, device=idx.device)) % window  # (k, n)
        self.codebook_used[:k].scatter_(1, cols, idx)
        self._window_pos[:k] = (self._window_pos[:k] + n) % window

    def _reinit(self, zg: torch.Tensor, scores: torch.Tensor, avg_probs: torch.Tensor, distributed: bool) -> None:
        """CVQ-style anchor re-init of the first k groups (reference A.1), consistent across ranks.

        zg (k, N, D) batch features, scores (k, N, K) = -||z - e||^2, avg_probs (k, K) batch usage (already all-reduced).
        """
        k, N, D = zg.shape
        K = self.codebook_size
        decay = self.reinit_decay
        self.embed_prob[:k].lerp_(avg_probs, decay)
        # per code: one feature drawn with probability softmax over features of its score (the reference's
        # multinomial(softmax((d - max d)^T))); with several ranks: exact draw from the union of all ranks' features
        logits = scores.transpose(1, 2).float()  # (k, K, N)
        probs = torch.softmax(logits, dim=-1)
        pick = torch.multinomial(probs.reshape(k * K, N), 1).view(k, K)  # (k, K)
        feats = torch.gather(zg, 1, pick.unsqueeze(-1).expand(-1, -1, D))  # (k, K, D)
        if distributed:
            world = dist.get_world_size()
            lse = torch.logsumexp(logits, dim=-1)  # (k, K) local log-normaliser
            packed = torch.cat([feats.float(), lse.unsqueeze(-1)], dim=-1).contiguous()  # (k, K, D+1)
            gathered = [torch.empty_like(packed) for _ in range(world)]
            dist.all_gather(gathered, packed)
            allp = torch.stack(gathered)  # (W, k, K, D+1)
            u = torch.rand(k, K, 1, device=zg.device)
            dist.broadcast(u, src=0)  # shared randomness for the choice of rank
            rank_probs = torch.softmax(allp[..., D], dim=0).permute(1, 2, 0)  # (k, K, W)
            cdf = rank_probs.cumsum(-1)
            r = (cdf < u).sum(-1).clamp_max(world - 1)  # (k, K)
            feats = torch.gather(allp[..., :D].permute(1, 2, 0, 3), 2,
                                 r[..., None, None].expand(-1, -1, 1, D)).squeeze(2).to(zg.dtype)
        keep = 1 - torch.exp(-(self.embed_prob[:k] * K * 10) / decay - 1e-3)  # (k, K): ~1 used, ~1e-3 dead
        w = self.embedding.weight.data.view(self.groups, K, D)[:k]
        w.mul_(keep.unsqueeze(-1)).add_(feats.to(w.dtype) * (1 - keep.unsqueeze(-1)))
