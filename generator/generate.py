"""The one sampler: static KV cache, classifier-free guidance, per-sub-codebook temperature / top-k / top-p.

    codes = generate(model, torch.tensor([207, 360]), guidance_scale=4.0, top_k=2000, generator=g)  # (B, h, w, G)

Per call: allocate the backbone KV cache (and the AR head's small (G+1)-slot cache), prefill the class token,
then decode one position at a time. With CFG the batch is [cond; uncond] (uncond label = num_classes), logits
are uncond + s * (cond - uncond), and the sampled (sub-)token is fed to both halves.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .model import GPT

Scalar = float | int | None
PerGroup = Scalar | Sequence[Scalar]


def _per_group(name: str, value: PerGroup, G: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != G:
            raise ValueError(f"{name}={list(value)!r}: a per-group list needs one value per sub-codebook (G={G})")
        return list(value)
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a number or a list of G={G} numbers, not a tensor")
    return [value] * G


def sample_logits(logits, temperature, top_k, top_p, generator=None):
    """Sample from logits (N, G', K) with one temperature / top_k / top_p per column g (lists of length G').

    top_k: None/0 = off, 1 = greedy (argmax); top_p: None/>=1 = off (HF semantics: keep the smallest set whose
    probability reaches top_p, always at least the best token); temperature 0 = greedy. Returns (N, G') int64.
    """
    N, Gp, K = logits.shape
    logits = logits.float()
    greedy = [(k is not None and int(k) == 1) or (t is not None and float(t) == 0.0) for k, t in zip(top_k, temperature)]
    if all(greedy):
        return logits.argmax(-1)
    temps = torch.tensor([max(float(1.0 if t is None else t), 1e-5) for t in temperature], device=logits.device)
    logits = logits / temps[:, None]
    ks = [0 if (k is None or int(k) <= 0) else min(int(k), K) for k in top_k]
    if any(k > 0 for k in ks):
        kmax = max(ks)
        topv = torch.topk(logits, kmax, dim=-1).values  # (N, G', kmax)
        kidx = torch.tensor([k - 1 if k > 0 else kmax - 1 for k in ks], device=logits.device)
        thresh = topv.gather(-1, kidx.view(1, Gp, 1).expand(N, Gp, 1))  # (N, G', 1)
        active = torch.tensor([k > 0 for k in ks], device=logits.device).view(1, Gp, 1)
        logits = logits.masked_fill(active & (logits < thresh), float("-inf"))
    ps = [1.0 if p is None else float(p) for p in top_p]
    if any(p < 1.0 for p in ps):
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        exclusive = probs.cumsum(-1) - probs  # mass strictly before each token
        pt = torch.tensor(ps, device=logits.device).view(1, Gp, 1)
        remove_sorted = exclusive > pt  # the best token always stays (exclusive = 0)
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(-1)
    out = torch.multinomial(probs.view(-1, K), 1, generator=generator).view(N, Gp)
    if any(greedy):
        g = torch.tensor(greedy, device=logits.device).view(1, Gp)
        out = torch.where(g, logits.argmax(-1), out)
    return out


def _cfg_scale(t: int, L: int, scale: float, interval: int | None, schedule: str) -> float | None:
    """Guidance scale for position t, or None for cond-only logits.

    cfg_interval follows LlamaGen: CFG is used for the prefill token and the decode steps i <= cfg_interval,
    i.e. positions t <= cfg_interval + 1; None or -1 = every position. "linear" ramps 1 -> scale over t.
    """
    if interval is not None and interval > -1 and t > interval + 1:
        return None
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * (t / max(L - 1, 1))
    return scale


def _combine(logits, B: int, s: float | None):  # (2B, ...) -> (B, ...)
    cond, uncond = logits[:B], logits[B:]
    return cond if s is None else uncond + s * (cond - uncond)


def _backbone_step(model: GPT, codes, input_pos):  # codes (N, 1, G) -> normed hidden (N, D)
    return model.backbone(model.embed_codes(codes), input_pos)[:, -1]


def _parallel_logits(model: GPT, h):  # (N, D) -> (N, G, K)
    cfg = model.config
    return model.output(h).view(h.shape[0], cfg.groups, cfg.codebook_size)


@torch.no_grad()
def generate(
    model: GPT,
    class_labels,
    guidance_scale: float = 1.0,
    temperature: PerGroup = 1.0,
    top_k: PerGroup = None,
    top_p: PerGroup = None,
    cfg_interval: int | None = None,
    cfg_schedule: str = "constant",
    generator: torch.Generator | None = None,
    compile: bool = False,
    progress: bool = False,
    return_logits: bool = False,
):
    """Sample codes (B, h, w, G) int64 (local indices per sub-codebook) for class_labels (B,).

    guidance_scale: CFG scale s (1.0 = no uncond half). temperature / top_k / top_p: a scalar or a list of G
    values (one per sub-codebook); top_k=1 is greedy. cfg_interval: LlamaGen semantics (see _cfg_scale).
    cfg_schedule: "constant" | "linear". generator: torch.Generator on the model's device.
    compile: torch.compile the one-position decode step (and the AR-head steps).
    return_logits: also return the (guided, unfiltered) logits the sampler saw, (B, h, w, G, K) float32.
    """
    cfg = model.config
    G, K, L = cfg.groups, cfg.codebook_size, cfg.block_size
    if cfg_schedule not in ("constant", "linear"):
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: valid: 'constant', 'linear'")
    temps, topks, topps = (_per_group(n, v, G) for n, v in (("temperature", temperature), ("top_k", top_k),
                                                           ("top_p", top_p)))
    device = next(model.parameters()).device
    labels = torch.as_tensor(class_labels, device=device).long().view(-1)
    if labels.numel() == 0 or labels.min() < 0 or labels.max() > cfg.num_classes:
        raise ValueError(f"class_labels must be in [0, {cfg.num_classes}] (num_classes = null class); got {labels.tolist()}")
    B = labels.shape[0]
    use_cfg = float(guidance_scale) != 1.0 or cfg_schedule != "constant"
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    N = labels.shape[0]

    step = _backbone_step
    ar_prefill, ar_decode = (model.ar_head.prefill, model.ar_head.decode) if cfg.head == "ar" else (None, None)
    if compile:
        step = torch.compile(_backbone_step, fullgraph=True, dynamic=False)
        if cfg.head == "ar":
            ar_prefill = torch.compile(ar_prefill, fullgraph=True, dynamic=False)
            ar_decode = torch.compile(ar_decode, fullgraph=True, dynamic=False)

    was_training = model.training
    model.eval()
    out = torch.empty(B, L, G, dtype=torch.long, device=device)
    seen = torch.empty(B, L, G, K, dtype=torch.float32, device=device) if return_logits else None
    positions = range(L)
    if progress:
        from tqdm import tqdm

        positions = tqdm(positions, desc="generate", total=L)
    try:
        model.setup_caches(N, device=device)
        h = model.backbone(model.embed_class(labels), torch.tensor([0], device=device))[:, -1]  # (N, D)
        for t in positions:
            s = _cfg_scale(t, L, float(guidance_scale), cfg_interval, cfg_schedule) if use_cfg else None
            if cfg.head == "parallel":
                logits = _parallel_logits(model, h).float()  # (N, G, K)
                logits = _combine(logits, B, s) if use_cfg else logits
                tok = sample_logits(logits, temps, topks, topps, generator)  # (B, G)
                if seen is not None:
                    seen[:, t] = logits
            else:
                tok = torch.empty(B, G, dtype=torch.long, device=device)
                for g in range(G):
                    if g == 0:
                        lg = ar_prefill(h, torch.arange(2, device=device))
                    else:
                        prev = tok[:, g - 1].repeat(N // B)
                        lg = ar_decode(prev, torch.tensor([g + 1], device=device))
                    lg = lg.float()
                    lg = _combine(lg, B, s) if use_cfg else lg  # (B, K)
                    tok[:, g] = sample_logits(lg[:, None], temps[g:g + 1], topks[g:g + 1], topps[g:g + 1],
                                              generator)[:, 0]
                    if seen is not None:
                        seen[:, t, g] = lg
            out[:, t] = tok
            if t + 1 < L:
                nxt = tok.repeat(N // B, 1)[:, None]  # (N, 1, G): same sub-tokens for both CFG halves
                h = step(model, nxt, torch.tensor([t + 1], device=device))
    finally:
        model.clear_caches()
        model.train(was_training)
    out = out.view(B, cfg.grid, cfg.grid, G)
    if return_logits:
        return out, seen.view(B, cfg.grid, cfg.grid, G, K)
    return out
