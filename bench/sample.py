"""Sampling throughput: static-KV-cache decoding (generator.generate) vs a naive decoder that recomputes the
whole prefix at every step (what a cache-less implementation does). Prints a table; never asserted on in tests.

    python bench/sample.py                                  # CPU: GPT-tiny / B / L, batch 1, 8, 32, CFG 2.0
    python bench/sample.py --presets GPT-tiny --batches 1 8 --full
    python bench/sample.py --device cuda --presets GPT-XXL --compile --dtype bfloat16 --batches 8 32 --full

Method. Per generated position t the cached decoder costs one 1-token step (attention over the fixed-size cache:
cost independent of t), the naive one a full forward over the t+1-token prefix. Both are timed at `--points`
positions spread over the L = grid^2 positions (random codes in the prefix / cache; timing does not depend on
values) and integrated (trapezoid) into the time for one full image batch ("est" columns). `--full` also times
the real end-to-end generate() call (and the real naive loop for batches in --naive-batches) to check the
estimate. Tokens/s counts generated positions of the conditional images (B * L per batch; the CFG uncond half
is work, not output). Default CPU run: about 2-4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generator import GPT, generate  # noqa: E402
from generator.generate import _combine, sample_logits  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, budget_s=0.5, max_rounds=5):
    """Min over rounds (robust to other load on shared cores); a call slower than budget_s is timed once
    (the caller warms up first)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()  # also the warm-up
    _sync(device)
    best = time.perf_counter() - t0
    if best > budget_s:
        return best
    spent, rounds = 0.0, 0
    while rounds < max_rounds and spent < budget_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent, rounds = min(best, dt), spent + dt, rounds + 1
    return best


def _once(fn, device, warmup: bool):
    if warmup:
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def head_and_sample(model, h, prefix_t, B, scale, top_k):
    """Per-position sampling from backbone features h (N, D); the AR head recomputes its prefix (no cache)."""
    cfg = model.config
    if cfg.head == "parallel":
        lg = model.output(h).view(h.shape[0], cfg.groups, cfg.codebook_size).float()
        return sample_logits(_combine(lg, B, scale), [1.0] * cfg.groups, [top_k] * cfg.groups, [None] * cfg.groups)
    tok = torch.zeros(B, cfg.groups, dtype=torch.long, device=h.device)
    for g in range(cfg.groups):  # reference-style: re-run the whole head on [h, SOS, E(g_<j)] per sub-token
        lg = model.ar_head(h, tok.repeat(h.shape[0] // B, 1))[:, g].float()
        tok[:, g] = sample_logits(_combine(lg, B, scale)[:, None], [1.0], [top_k], [None])[:, 0]
    return tok


@torch.inference_mode()
def naive_step(model, labels, prefix, B, scale, top_k):  # prefix (N, t, G) -> (B, G)
    x = model.embed_class(labels)
    if prefix.shape[1]:
        x = torch.cat([x, model.embed_codes(prefix)], 1)
    return head_and_sample(model, model.backbone(x)[:, -1], prefix.shape[1], B, scale, top_k)


@torch.inference_mode()
def naive_generate(model, labels, B, scale, top_k):
    cfg = model.config
    codes = torch.zeros(labels.shape[0], 0, cfg.groups, dtype=torch.long, device=labels.device)
    for _ in range(cfg.block_size):
        tok = naive_step(model, labels, codes, B, scale, top_k)
        codes = torch.cat([codes, tok.repeat(labels.shape[0] // B, 1)[:, None]], 1)
    return codes[:B]


@torch.inference_mode()
def cached_step(model, labels, t, B, scale, top_k, G):  # one generate() decode step at position t (cache set up)
    dev = labels.device
    if t == 0:
        h = model.backbone(model.embed_class(labels), torch.tensor([0], device=dev))[:, -1]
    else:
        codes = torch.randint(0, model.config.codebook_size, (labels.shape[0], 1, G), device=dev)
        h = model.backbone(model.embed_codes(codes), torch.tensor([t], device=dev))[:, -1]
    cfg = model.config
    if cfg.head == "parallel":
        return head_and_sample(model, h, t, B, scale, top_k)
    tok = torch.zeros(B, G, dtype=torch.long, device=dev)
    for g in range(G):
        if g == 0:
            lg = model.ar_head.prefill(h, torch.arange(2, device=dev))
        else:
            lg = model.ar_head.decode(tok[:, g - 1].repeat(labels.shape[0] // B), torch.tensor([g + 1], device=dev))
        tok[:, g] = sample_logits(_combine(lg.float(), B, scale)[:, None], [1.0], [top_k], [None])[:, 0]
    return tok


def integrate(points, times, L):  # trapezoid over positions 0..L-1 of per-step times sampled at `points`
    total = 0.0
    for (p0, t0), (p1, t1) in zip(zip(points, times), zip(points[1:], times[1:])):
        total += (t0 + t1) / 2 * (p1 - p0)
    return total + (times[0] + times[-1]) / 2  # the endpoints' own steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["GPT-tiny", "GPT-B", "GPT-L"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--naive-batches", nargs="+", type=int, default=[1, 8],
                    help="batches at which to time the naive decoder (it is slow)")
    ap.add_argument("--naive-presets", nargs="+", default=["GPT-tiny", "GPT-B"])
    ap.add_argument("--grid", type=int, default=16, help="tokens per side (L = grid^2 = 256 by default)")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--codebook-size", type=int, default=16384)
    ap.add_argument("--head", default="parallel", choices=["parallel", "ar"])
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--points", type=int, default=3, help="positions sampled per estimate (>= 2)")
    ap.add_argument("--full", action="store_true", help="also time the real end-to-end generate() (+ naive loop)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="generate(compile=True) (with --full)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch default); 1 by default: on shared CPUs multi-thread timings are erratic")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    L, G = args.grid ** 2, args.groups
    points = sorted({round(i * (L - 1) / (args.points - 1)) for i in range(args.points)})
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} L={L} G={G} K={args.codebook_size} "
          f"head={args.head} cfg={args.cfg} top_k={args.top_k} compile={args.compile} positions timed={points}")
    hdr = (f"{'preset':<9} {'params':>7} {'batch':>5} | {'cached tok/s':>12} {'img/s':>8} | {'naive tok/s':>11} "
           f"{'img/s':>8} | {'speedup':>7} | {'generate() img/s':>16} {'naive loop img/s':>16}")
    print(hdr)
    print("-" * len(hdr))
    for preset in args.presets:
        torch.manual_seed(0)
        model = GPT.from_preset(preset, groups=G, codebook_size=args.codebook_size, grid=args.grid, head=args.head)
        model = model.to(device=device, dtype=dtype).eval()
        if args.head == "parallel":
            torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-init head would make every logit equal
        for B in args.batches:
            labels = torch.randint(0, 1000, (B,), device=device)
            lab2 = torch.cat([labels, torch.full_like(labels, 1000)]) if args.cfg != 1.0 else labels
            N, scale = lab2.shape[0], (args.cfg if args.cfg != 1.0 else None)
            model.setup_caches(N)
            for _ in range(2):  # warm-up (allocator, cuBLAS/oneDNN init) so the first timed call is not cold
                cached_step(model, lab2, 0, B, scale, args.top_k, G)
                naive_step(model, lab2, lab2.new_zeros(N, 1, G), B, scale, args.top_k)
            times = [_timeit(lambda: cached_step(model, lab2, t, B, scale, args.top_k, G), device) for t in points]
            model.clear_caches()
            cached = integrate(points, times, L)
            naive = None
            if B in args.naive_batches and preset in args.naive_presets:
                ntimes = []
                for t in points:
                    prefix = torch.randint(0, args.codebook_size, (N, t, G), device=device)
                    ntimes.append(_timeit(lambda: naive_step(model, lab2, prefix, B, scale, args.top_k), device))
                naive = integrate(points, ntimes, L)
            gen_ips = loop_ips = None
            if args.full:
                run = lambda: generate(model, labels, guidance_scale=args.cfg, top_k=args.top_k or None,  # noqa
                                       compile=args.compile)
                gen_ips = B / _once(run, device, warmup=True)
                if naive is not None:
                    loop_ips = B / _once(lambda: naive_generate(model, lab2, B, scale, args.top_k), device, False)

            def fmt(x, w):
                return f"{x:>{w}.3g}" if x is not None else f"{'-':>{w}}"

            print(f"{preset:<9} {model.num_parameters() / 1e6:>6.1f}M {B:>5} | {B * L / cached:>12.4g} "
                  f"{fmt(B / cached, 8)} | {fmt(B * L / naive if naive else None, 11)} "
                  f"{fmt(B / naive if naive else None, 8)} | {fmt(naive / cached if naive else None, 6)}x | "
                  f"{fmt(gen_ips, 16)} {fmt(loop_ips, 16)}", flush=True)
        del model


if __name__ == "__main__":
    main()
