"""The one sampler: static KV cache, classifier-free guidance, per-sub-codebook temperature / top-k / top-p.

    codes = generate(model, torch.tensor([207, 360]), guidance_scale=4.0, top_k=2000, generator=g)  # (B, h, w, G)
    codes = generate(model, labels, guidance_scale=4.0, top_k=2000, compile=True)   # GPU: CUDA-graphed decode step
    codes = generate(t2i_model, feats, cond_mask=mask, guidance_scale=7.5)  # text: caption features, left-padded

Text-conditional models (conditioning="text", LlamaGen t2i): the prefix is T caption tokens (prefilled at once with
their padding mask); the uncond half is the null caption with the SAME padding mask as the caption (LlamaGen), or a
negative caption (negative_cond / negative_cond_mask); every step attends through a per-sample key mask.

Per call: attach the backbone KV cache (and the AR head's small (G+1)-slot cache), prefill the class token, then
decode one position at a time. With CFG the batch is [cond; uncond] (uncond label = num_classes), logits are
uncond + s * (cond - uncond), and the sampled (sub-)token is fed to both halves.

Speed (the gpt-fast recipe):
- the caches are allocated once per (model, batch, dtype, device) and reused by the next call of the same shape
  (one entry per model, freed with the model or by release_caches(model)); stale entries are never read (a
  position is written before it is attended to, later positions are masked);
- one decode step = embed the previous position's tokens -> backbone at one position -> head (the AR head's whole
  G-sub-token loop, unrolled) -> CFG combine -> per-group temperature / top-k / top-p sampling: one static-shape
  function of tensors only, which compile= hands to torch.compile (mode "reduce-overhead" on CUDA = one CUDA
  graph replay per position);
- sampling needs no host-device sync: the random numbers (uniform noise, drawn from `generator` outside the step)
  go in as a tensor and a token is argmax(p / E) with E = -log(u) ~ Exp(1) (the exponential race, an exact draw
  from p); under top-k (and top-p) the race runs over the sorted top-k candidates only. Eager and compiled run
  the same function on the same noise, so they draw the same tokens up to float rounding of the logits.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .model import GPT, KVCache, find_multiple

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


# ---------------------------------------------------------------------------------------------------------- sampling


class _Sampling:
    """Per-call sampling settings for G' columns: device tensors (inputs of the step) + Python constants (shapes)."""

    def __init__(self, temperature: list, top_k: list, top_p: list, K: int, device):
        self.K = K
        self.greedy = tuple(bool((k is not None and int(k) == 1) or (t is not None and float(t) == 0.0))
                            for k, t in zip(top_k, temperature))
        self.ks = tuple(0 if (k is None or int(k) <= 0) else min(int(k), K) for k in top_k)
        self.ps = tuple(1.0 if p is None else float(p) for p in top_p)
        self.temps = tuple(max(float(1.0 if t is None else t), 1e-5) for t in temperature)
        self.all_greedy = all(self.greedy)
        self.any_top_p = any(p < 1.0 for p in self.ps)
        # filtered draws work on the sorted top-`width` candidates: kmax when every column has a top-k, else all K
        self.filtered = any(k > 0 for k in self.ks) or self.any_top_p
        self.width = (max(self.ks) if all(k > 0 for k in self.ks) else K) if self.filtered else K
        self.tensors = (
            torch.tensor(self.temps, device=device),  # (G',)
            torch.tensor([k if k > 0 else self.width for k in self.ks], device=device),  # kept candidates (G',)
            torch.tensor(self.ps, device=device),  # (G',)
            torch.tensor(self.greedy, device=device),  # (G',)
        )

    def column(self, g: int) -> "_Sampling":
        return _Sampling([self.temps[g]] if not self.greedy[g] else [0.0], [self.ks[g]], [self.ps[g]], self.K,
                         self.tensors[0].device)

    @property
    def spec(self) -> tuple:  # the Python constants the step specialises on
        return self.all_greedy, self.filtered, self.width, self.any_top_p, any(self.greedy)

    def noise(self, rows: int, generator):  # uniform [0, 1) noise for one draw of (rows, G') tokens, or None
        if self.all_greedy:
            return None
        t = self.tensors[0]
        if isinstance(generator, (list, tuple)):  # one generator per row (image): each row its own stream
            return torch.stack([torch.rand(len(self.ks), self.width, device=g.device, generator=g)
                                for g in generator]).to(t.device)
        return torch.rand(rows, len(self.ks), self.width, device=t.device, generator=generator)


def _draw(logits, noise, tensors, spec):
    """Tokens (N, G') from logits (N, G', K) float32 and uniform noise (N, G', width); no host sync, static shapes."""
    all_greedy, filtered, width, any_top_p, any_greedy = spec
    if all_greedy:
        return logits.argmax(-1)
    temps, kept, top_p, greedy = tensors
    N, Gp, K = logits.shape
    scaled = logits / temps.view(1, Gp, 1)
    race = -torch.log(noise)  # Exp(1) (inf where u = 0: that candidate never wins)
    if filtered:
        vals, idx = torch.topk(scaled, width, dim=-1)  # sorted, descending
        rank = torch.arange(width, device=logits.device).view(1, 1, width)
        vals = vals.masked_fill(rank >= kept.view(1, Gp, 1), float("-inf"))  # per-column top-k
        if any_top_p:  # keep the smallest prefix whose mass reaches top_p (the best candidate always stays)
            probs = vals.softmax(-1)
            exclusive = probs.cumsum(-1) - probs
            vals = vals.masked_fill(exclusive > top_p.view(1, Gp, 1), float("-inf"))
        choice = (vals.softmax(-1) / race).argmax(-1, keepdim=True)  # (N, G', 1)
        out = idx.gather(-1, choice).squeeze(-1)
    else:
        out = (scaled.softmax(-1) / race).argmax(-1)
    if any_greedy:
        out = torch.where(greedy.view(1, Gp), logits.argmax(-1), out)
    return out


def sample_logits(logits, temperature, top_k, top_p, generator=None):
    """Sample from logits (N, G', K) with one temperature / top_k / top_p per column g (lists of length G').

    top_k: None/0 = off, 1 = greedy (argmax); top_p: None/>=1 = off (HF semantics: keep the smallest set whose
    probability reaches top_p, always at least the best token); temperature 0 = greedy. Returns (N, G') int64.
    The same draw generate() makes at every position.
    """
    N, Gp, K = logits.shape
    s = _Sampling(list(temperature), list(top_k), list(top_p), K, logits.device)
    return _draw(logits.float(), s.noise(N, generator), s.tensors, s.spec)


# ------------------------------------------------------------------------------------------------------ decode step


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


def _combine(logits, B: int, s):  # (2B, ...) -> (B, ...); s: None (cond only), a float or a 0-d tensor
    cond, uncond = logits[:B], logits[B:]
    return cond if s is None else uncond + s * (cond - uncond)


def _head_and_draw(model: GPT, h, pos, noise, scale, samp_tensors, spec, eager: bool = False):
    """Backbone features h (N, D) of one position -> tokens (B, G) [, guided logits (B, G, K) float32].

    spec = (B, guided, want_logits, sampling spec, per-column sampling specs of the AR head, N // B).
    eager: the AR head attends to its filled cache slots only (static full-cache shapes otherwise)."""
    B, guided, want_logits, sspec, col_specs, _ = spec
    cfg = model.config
    N, G, K = h.shape[0], cfg.groups, cfg.codebook_size
    if cfg.head == "parallel":
        logits = model.output(h).view(N, G, K).float()
        logits = _combine(logits, B, scale if guided else None)
        tok = _draw(logits, noise, samp_tensors, sspec)
        return (tok, logits) if want_logits else (tok, None)
    toks, seen = [], []
    ar = model.ar_head
    for g in range(G):  # the AR head's G sub-tokens, each from a 1-slot cached step over (G+1) slots
        if g == 0:
            lg = ar.prefill(h, pos[:2], 2 if eager else None)
        else:
            lg = ar.decode(toks[-1].repeat(N // B), pos[g + 1:g + 2], g + 2 if eager else None)
        lg = _combine(lg.float(), B, scale if guided else None)  # (B, K)
        col = tuple(t[g:g + 1] for t in samp_tensors)
        width = col_specs[g][2]  # <= the noise width (the widest column's)
        toks.append(_draw(lg[:, None], None if noise is None else noise[:, g:g + 1, :width], col, col_specs[g])[:, 0])
        seen.append(lg)
    tok = torch.stack(toks, 1)
    return (tok, torch.stack(seen, 1)) if want_logits else (tok, None)


def _decode_step(model: GPT, prev, pos_t, pos, noise, scale, samp_tensors, spec, kv_len: int | None = None,
                 key_mask=None):
    """One position: tokens of the previous position prev (B, G) -> this position's tokens (B, G).

    Every argument that changes from step to step is a tensor (prev, the position pos_t (1,), noise, scale);
    spec holds only Python constants, so torch.compile traces one graph per sampling setting (kv_len=None: the
    static full-cache attention). Eager calls pass kv_len = pos_t + 1 to attend to the filled prefix only.
    key_mask: text models' per-sample (N, 1, S, S) mask over the cache (caption padding), None for class models."""
    reps = spec[5]  # 2 with CFG: the same sub-tokens go to the cond and the uncond half
    x = model.embed_codes((prev if reps == 1 else prev.repeat(reps, 1))[:, None])  # (N, 1, D)
    mask = None
    if key_mask is not None:
        mask = key_mask[:, :, pos_t] if kv_len is None else key_mask[:, :, kv_len - 1:kv_len, :kv_len]
    h = model.backbone(x, pos_t, kv_len, mask)[:, -1]
    return _head_and_draw(model, h, pos, noise, scale, samp_tensors, spec, eager=kv_len is not None)


# ----------------------------------------------------------------------------------------------------------- caches

_CACHES: "weakref.WeakKeyDictionary[GPT, tuple]" = weakref.WeakKeyDictionary()


def _attention_modules(model: GPT) -> list:
    mods = [layer.attention for layer in model.layers]
    if model.config.head == "ar":
        mods += [blk.attention for blk in model.ar_head.causal_space_blocks]
    return mods


def _attach_caches(model: GPT, rows: int, dtype, device, static: bool) -> None:
    """Attach the model's KV caches for `rows` sequences, reusing the last ones when (rows, dtype, device) match."""
    key = (rows, dtype, torch.device(device))
    mods = _attention_modules(model)
    entry = _CACHES.get(model)
    if entry is not None and entry[0] == key:
        for m, c in zip(mods, entry[1]):
            m.kv_cache = c
    else:
        _CACHES.pop(model, None)  # free the old shape before allocating the new one
        model.setup_caches(rows, dtype=dtype, device=device)
        _CACHES[model] = (key, [m.kv_cache for m in mods], {})  # + window views of the backbone caches
    if static:  # fixed addresses: a captured CUDA graph reads and writes these very buffers on every replay
        for c in _CACHES[model][1]:
            for buf in (c.k_cache, c.v_cache, c.mask):
                torch._dynamo.mark_static_address(buf)


def _windows(S: int) -> list[int]:
    """The compiled step's static attention lengths: 4 steps of ceil(S/4) (multiple of 8) up to the cache size S."""
    step = find_multiple(-(-S // 4), 8)
    return sorted({min(S, k * step) for k in range(1, -(-S // step) + 1)})


def _window_caches(model: GPT, w: int) -> list:
    """Views of the backbone caches' first w slots (kept with the caches: stable objects and addresses, so each
    window compiles / captures once). The compiled step attends over a window >= the filled prefix instead of the
    whole cache: ~40% fewer KV-cache bytes per step on average (what large batches are bound by)."""
    entry = _CACHES[model]
    views = entry[2].get(w)
    if views is None:
        views = []
        for c in entry[1][:len(model.layers)]:
            v = KVCache.__new__(KVCache)
            nn.Module.__init__(v)
            for name, buf in (("k_cache", c.k_cache[:, :, :w]), ("v_cache", c.v_cache[:, :, :w]),
                              ("mask", c.mask[:w, :w])):
                v.register_buffer(name, buf, persistent=False)
                torch._dynamo.mark_static_address(buf)
            views.append(v)
        entry[2][w] = views
    return views


def release_caches(model: GPT) -> None:
    """Free the KV caches generate() keeps for `model` (they are otherwise reused by the next same-shape call)."""
    _CACHES.pop(model, None)
    model.clear_caches()


_COMPILED: dict = {}


def _compiled_step(mode: str | None):
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[mode]


# ---------------------------------------------------------------------------------------------------------- generate


@torch.no_grad()
def generate(
    model: GPT,
    cond,
    guidance_scale: float = 1.0,
    temperature: PerGroup = 1.0,
    top_k: PerGroup = None,
    top_p: PerGroup = None,
    cfg_interval: int | None = None,
    cfg_schedule: str = "constant",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    compile: bool | str = False,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    return_logits: bool = False,
    cond_mask=None,
    negative_cond=None,
    negative_cond_mask=None,
):
    """Sample codes (B, h, w, G) int64 (local indices per sub-codebook) for class labels cond (B,), or, for a
    text-conditional model, caption features cond (B, T, caption_dim), left-padded, with cond_mask (B, T) bool
    (True = valid token; None = all valid). With CFG the uncond half is the null caption under the SAME mask, or
    negative_cond (B, T', caption_dim) with its own negative_cond_mask.

    guidance_scale: CFG scale s (1.0 = no uncond half). temperature / top_k / top_p: a scalar or a list of G
    values (one per sub-codebook); top_k=1 is greedy. cfg_interval: LlamaGen semantics (see _cfg_scale).
    cfg_schedule: "constant" | "linear". generator: torch.Generator on the model's device, or a list of B
    generators (one per image; fastest on the model's device): image i's noise then comes from generator i alone,
    so it is the same image whatever else is in the batch (up to batch-size-dependent rounding of the logits).
    compile: False = eager (default); True = torch.compile the decode step ("reduce-overhead", i.e. CUDA graphs,
    on CUDA; inductor's default mode on CPU); or a torch.compile mode string. The first call per (model, batch,
    sampling setting) pays the compile time; later calls reuse the graph and the KV caches.
    dtype: compute dtype. None = the model's parameter dtype (fastest: cast the model itself, e.g.
    GPT.from_pretrained(..., dtype=torch.bfloat16)); a lower precision than the weights runs the whole call under
    torch.autocast (weights cast once per call) with the KV cache in that dtype.
    return_logits: also return the (guided, unfiltered) logits the sampler saw, (B, h, w, G, K) float32.
    """
    cfg = model.config
    G, K, L = cfg.groups, cfg.codebook_size, cfg.block_size
    device = next(model.parameters()).device
    compute_dtype, autocast = _check_settings(model, cfg_schedule, compile, dtype)
    temps, topks, topps = (_per_group(n, v, G) for n, v in (("temperature", temperature), ("top_k", top_k),
                                                           ("top_p", top_p)))
    use_cfg = float(guidance_scale) != 1.0 or cfg_schedule != "constant"
    c = _prepare_condition(model, cond, cond_mask, negative_cond, negative_cond_mask, use_cfg, device)
    if isinstance(generator, (list, tuple)) and len(generator) != c.B:
        raise ValueError(f"generator: a list needs one torch.Generator per image ({c.B}), got {len(generator)}")

    samp = _Sampling(temps, topks, topps, K, device)
    col_specs = tuple(samp.column(g).spec for g in range(G)) if cfg.head == "ar" else ()
    scales = [_cfg_scale(t, L, float(guidance_scale), cfg_interval, cfg_schedule) if use_cfg else None
              for t in range(L)]
    scale_t = torch.tensor([1.0 if s is None else s for s in scales], device=device)  # (L,), read as views
    specs = [(c.B, s is not None, return_logits, samp.spec, col_specs, c.N // c.B) for s in scales]
    step = _decode_step
    if compile:
        mode = compile if isinstance(compile, str) else ("reduce-overhead" if device.type == "cuda" else None)
        step = _compiled_step(None if mode == "default" else mode)

    was_training = model.training
    model.eval()
    out = torch.empty(c.B, L, G, dtype=torch.long, device=device)
    seen = torch.empty(c.B, L, G, K, dtype=torch.float32, device=device) if return_logits else None
    amp = torch.autocast(device.type, dtype=compute_dtype, enabled=autocast)
    # one graph per (sampling setting, CFG on/off, attention window, model, batch): more than dynamo's default 8
    limit = torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit))
    try:
        _attach_caches(model, c.N, compute_dtype, device, static=bool(compile))
        with amp, limit:
            _decode_loop(model, c, step, bool(compile), samp, scale_t, specs, generator, out, seen, progress)
    finally:
        model.clear_caches()  # detach (the tensors stay in _CACHES for the next call)
        model.train(was_training)
    out = out.view(c.B, cfg.grid, cfg.grid, G)
    if return_logits:
        return out, seen.view(c.B, cfg.grid, cfg.grid, G, K)
    return out


def _check_settings(model: GPT, cfg_schedule: str, compile, dtype) -> tuple[torch.dtype, bool]:
    """Validate the call-level settings; -> (compute dtype, whether autocast is needed)."""
    if cfg_schedule not in ("constant", "linear"):
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: valid: 'constant', 'linear'")
    if compile not in (True, False) and compile not in ("default", "reduce-overhead", "max-autotune",
                                                        "max-autotune-no-cudagraphs"):
        raise ValueError(f"compile={compile!r}: valid: False, True, 'default', 'reduce-overhead', 'max-autotune', "
                         f"'max-autotune-no-cudagraphs'")
    param = next(model.parameters())
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}: valid: 'float32', 'bfloat16', 'float16' (or a torch.dtype)")
        dtype = getattr(torch, dtype)
    compute_dtype = dtype or param.dtype
    autocast = compute_dtype != param.dtype
    if autocast and compute_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={compute_dtype}: the model's weights are {param.dtype}; a different compute dtype "
                         f"must be torch.bfloat16 or torch.float16 (or cast the model: model.to(dtype))")
    return compute_dtype, autocast


@dataclass
class _Condition:
    B: int  # images
    N: int  # rows through the model (2B with CFG)
    labels: torch.Tensor | None = None  # (N,) class path
    feats: torch.Tensor | None = None  # (N, T, caption_dim) text path, left-padded
    mask: torch.Tensor | None = None  # (N, T) bool, True = valid caption token


def _prepare_condition(model: GPT, cond, cond_mask, negative_cond, negative_cond_mask, use_cfg: bool,
                       device) -> _Condition:
    """Class labels (+ the null class) or caption features (+ the null caption under the SAME mask, or a negative
    caption with its own mask), stacked [cond; uncond] when CFG is on."""
    cfg = model.config
    if cfg.conditioning == "class":
        if cond_mask is not None or negative_cond is not None:
            raise ValueError("cond_mask / negative_cond are for text-conditional GPTs; this one takes class labels")
        labels = torch.as_tensor(cond, device=device).long().view(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() > cfg.num_classes:
            raise ValueError(f"class_labels must be in [0, {cfg.num_classes}] (num_classes = null class); got "
                             f"{labels.tolist()}")
        B = labels.shape[0]
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        return _Condition(B=B, N=labels.shape[0], labels=labels)
    feats, fmask = model.prepare_caption(torch.as_tensor(cond, device=device),
                                         None if cond_mask is None else torch.as_tensor(cond_mask, device=device))
    B = feats.shape[0]
    if use_cfg:
        if negative_cond is None:
            if negative_cond_mask is not None:
                raise ValueError("negative_cond_mask without negative_cond")
            neg, nmask = model.null_caption(B).to(feats.dtype), fmask  # the SAME padding mask (LlamaGen)
        else:
            neg, nmask = model.prepare_caption(
                torch.as_tensor(negative_cond, device=device),
                None if negative_cond_mask is None else torch.as_tensor(negative_cond_mask, device=device))
            if neg.shape[0] != B:
                raise ValueError(f"negative_cond has {neg.shape[0]} rows; it needs one per caption ({B})")
        feats, fmask = torch.cat([feats, neg]), torch.cat([fmask, nmask])
    elif negative_cond is not None:
        raise ValueError("negative_cond needs guidance (guidance_scale != 1.0)")
    return _Condition(B=B, N=feats.shape[0], feats=feats, mask=fmask)


def _decode_loop(model: GPT, c: _Condition, step, compiled: bool, samp: _Sampling, scale_t, specs, generator, out,
                 seen, progress: bool) -> None:
    """Fill out (B, L, G) position by position: the condition prefix once (eager), then one decode step per position
    (compiled steps attend over a static window of the cache)."""
    P, L = model.config.prefix_len, model.config.block_size
    device = out.device
    pos = torch.arange(L + P, device=device)  # input positions, read as views (no per-step host->device copy)
    S = model.layers[0].attention.kv_cache.k_cache.shape[2]
    windows, cur_w = _windows(S), None
    key_mask = None if c.mask is None else model.caption_attn_mask(c.mask, S)  # (N, 1, S, S): causal, valid, diag
    positions = range(L)
    if progress:
        from tqdm import tqdm

        positions = tqdm(positions, desc="generate", total=L)
    for t in positions:
        noise = samp.noise(c.B, generator)
        if t == 0:  # the condition prefix (once per call: eager)
            if key_mask is None:
                h = model.backbone(model.embed_class(c.labels), pos[:1], 1)[:, -1]
            else:
                h = model.backbone(model.embed_caption(c.feats), pos[:P], P, key_mask[:, :, :P, :P])[:, -1]
            tok, lg = _head_and_draw(model, h, pos, noise, scale_t[0], samp.tensors, specs[0], eager=True)
        elif compiled:
            w = next(x for x in windows if x >= P + t)  # static attention length covering P + t slots
            if w != cur_w:
                for layer, cache in zip(model.layers, _window_caches(model, w)):
                    layer.attention.kv_cache = cache
                cur_w = w
            tok, lg = step(model, out[:, t - 1], pos[P + t - 1:P + t], pos, noise, scale_t[t], samp.tensors,
                           specs[t], None, None if key_mask is None else key_mask[..., :w])
        else:
            tok, lg = step(model, out[:, t - 1], pos[P + t - 1:P + t], pos, noise, scale_t[t], samp.tensors,
                           specs[t], P + t, key_mask)
        out[:, t] = tok
        if seen is not None:
            seen[:, t] = lg
