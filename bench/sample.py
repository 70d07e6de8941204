"""Sampling speed of generator.generate: ms per decode step against the weight-read (memory) floor; optional
side-by-side with LlamaGen's own generate() on the same weights. Prints tables; never asserted on in tests.

    # the issue-13 table on one GPU: model x batch x eager/compiled x parallel/AR head, bf16, CFG 4, G=8 codes
    python bench/sample.py --device cuda --dtype bfloat16 --presets GPT-B GPT-XXL --batches 32 256 \\
        --groups 8 --codebook-size 2048 --heads parallel ar --modes eager compiled
    # CPU: ours vs LlamaGen generate() in one process, same weights (GPT-B, 256 tokens, CFG 4, top-k 2000)
    python bench/sample.py --presets GPT-B --batches 1 8 --modes eager compiled --cfg 4 --top-k 2000 \\
        --llamagen /work/.mirror/FoundationVision+LlamaGen/repo --repeats 5
    # smoke (seconds)
    python bench/sample.py --presets GPT-tiny --grid 4 --batches 2 --groups 2 --codebook-size 64 --heads parallel ar

Method. Every cell is a real end-to-end generate() call (class-token prefill + L decode steps, sampling included),
after one untimed warm-up call (compilation, CUDA-graph capture, allocator). --repeats timed calls per cell are
interleaved round-robin over all cells of a batch size (and LlamaGen's), so slow phases of a shared machine hit
every cell alike; the table shows medians. ms/step = call time / L. On the CPU the table also shows the thread's
CPU time (time.thread_time), which a loaded machine inflates far less than wall time.

Memory floor: the bytes one decode step must read at least (every weight matrix once, the AR head's G times,
plus the filled half of the KV cache on average), divided by the device's memory bandwidth (GPU: datasheet
value by name, --bandwidth-gbs overrides; CPU: measured here by summing a 512 MB tensor on the same threads).
"floor %" = floor / measured ms per step: 100 % means the step is as fast as reading the weights allows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generator import GPT, generate  # noqa: E402

BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
                 "A100-SXM4-80GB": 2039, "A100 80GB": 1935, "A100": 1555, "L40S": 864, "A10G": 600}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_bandwidth(device, threads: int) -> tuple[float, str]:
    """Bytes/s: the GPU's datasheet bandwidth by name, or the CPU's measured read bandwidth on `threads`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in BANDWIDTH_GBS.items():
            if key in name:
                return gbs * 1e9, f"{name} datasheet {gbs} GB/s"
        return float("nan"), f"{name}: unknown bandwidth (pass --bandwidth-gbs)"
    x = torch.ones(128 * 2**20)  # 512 MB
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best, f"CPU measured read bandwidth {x.numel() * 4 / best / 1e9:.1f} GB/s ({threads} thread(s))"


def step_bytes(model: GPT, rows: int, bytes_per: int) -> float:
    """Least bytes one decode step reads: weight matrices (gathered embedding rows are negligible), the AR head's
    weights once per sub-token, the KV cache's filled half on average."""
    cfg = model.config
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dense = numel(model.layers) + numel(model.norm)
    if cfg.input_mode == "projector":
        dense += numel(model.img_projector)
    if cfg.head == "parallel":
        dense += numel(model.output)
    else:
        h = model.ar_head
        dense += cfg.groups * (numel(h.causal_space_blocks) + numel(h.ln_f) + numel(h.head))
    kv = cfg.n_layer * 2 * rows * (cfg.n_kv_head or cfg.n_head) * cfg.head_dim * (cfg.block_size / 2)
    return (dense + kv) * bytes_per


# ----------------------------------------------------------------------------------------------------- LlamaGen


def load_llamagen(path: str):
    """LlamaGen's Transformer + generate from a checkout or a bare git mirror (files are never copied into this
    repository: a mirror is read with `git show` into a temporary folder)."""
    rel = ["autoregressive/models/gpt.py", "autoregressive/models/generate.py", "utils/drop_path.py"]
    root = path
    if not os.path.isfile(os.path.join(path, rel[0])):
        root = tempfile.mkdtemp(prefix="llamagen-")
        for r in rel:
            os.makedirs(os.path.join(root, os.path.dirname(r)), exist_ok=True)
            src = subprocess.run(["git", "--git-dir", path, "show", f"HEAD:{r}"], check=True, capture_output=True).stdout
            with open(os.path.join(root, r), "wb") as f:
                f.write(src)
        for d in ("autoregressive", "autoregressive/models", "utils"):
            open(os.path.join(root, d, "__init__.py"), "a").close()
    sys.path.insert(0, root)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # LlamaGen's per-step sdp_kernel() context
    from autoregressive.models.generate import generate as lg_generate
    from autoregressive.models.gpt import GPT_models

    return GPT_models, lg_generate


def llamagen_twin(model: GPT, preset: str, GPT_models):
    cfg = model.config
    if (cfg.groups, cfg.head, cfg.input_mode) != (1, "parallel", "sum"):
        raise SystemExit("--llamagen needs the LlamaGen layout: --groups 1 --heads parallel (sum input)")
    if preset not in GPT_models:
        raise SystemExit(f"--llamagen: LlamaGen has no {preset!r}; valid: {', '.join(GPT_models)}")
    lg = GPT_models[preset](vocab_size=cfg.codebook_size, block_size=cfg.block_size,
                                          num_classes=cfg.num_classes, cls_token_num=1, model_type="c2i")
    missing = lg.load_state_dict(model.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    p = next(model.parameters())
    return lg.to(device=p.device, dtype=p.dtype).eval()


# --------------------------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["GPT-B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--heads", nargs="+", default=["parallel"], choices=["parallel", "ar"])
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    ap.add_argument("--grid", type=int, default=16, help="tokens per side (L = grid^2 = 256 by default)")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--codebook-size", type=int, default=16384)
    ap.add_argument("--input-mode", default="sum", choices=["sum", "projector"])
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--top-k", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per cell (medians reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the model's weights are cast to this dtype (generate runs in the weights' dtype)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the floor (GB/s)")
    ap.add_argument("--llamagen", default=None, metavar="PATH",
                    help="LlamaGen checkout or git mirror: also time its generate() on the same weights")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's top ops of one eager generate() call per batch (and LlamaGen's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch default); 1 by default: on shared CPUs multi-thread timings are erratic")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    L = args.grid ** 2
    bw, bw_note = device_bandwidth(device, torch.get_num_threads())
    if args.bandwidth_gbs:
        bw, bw_note = args.bandwidth_gbs * 1e9, f"--bandwidth-gbs {args.bandwidth_gbs}"
    lg_models = lg_generate = None
    if args.llamagen:
        lg_models, lg_generate = load_llamagen(args.llamagen)
    cpu = device.type == "cpu"
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch {torch.__version__} | L={L} "
          f"G={args.groups} K={args.codebook_size} input={args.input_mode} CFG {args.cfg} top-k {args.top_k} | "
          f"{bw_note} | medians of {args.repeats} interleaved calls")
    cols = ["preset", "params", "head", "batch", "mode", "s/call", "ms/step", "img/s", "floor ms", "floor %"]
    if cpu:
        cols.append("CPU ms/step")
    rows = []
    top_k = args.top_k or None
    for preset in args.presets:
        for head in args.heads:
            torch.manual_seed(0)
            model = GPT.from_preset(preset, groups=args.groups, codebook_size=args.codebook_size, grid=args.grid,
                                    head=head, input_mode=args.input_mode,
                                    codebook=torch.randn(args.groups * args.codebook_size, 4)
                                    if args.input_mode == "projector" else None,
                                    codebook_embed_dim=4 * args.groups)
            if head == "parallel":
                torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-init head would make every logit equal
            model = model.to(device=device, dtype=dtype).eval()
            lg = llamagen_twin(model, preset, lg_models) if args.llamagen else None
            for B in args.batches:
                labels = torch.arange(B, device=device) % 1000
                rows_n = 2 * B if args.cfg != 1.0 else B
                floor = step_bytes(model, rows_n, torch.finfo(dtype).bits // 8) / bw
                cells = {}
                for mode in args.modes:
                    gen = torch.Generator(device=device).manual_seed(0)
                    cells[(mode, "ours")] = lambda c=(mode == "compiled"), g=gen: generate(  # noqa: E731
                        model, labels, guidance_scale=args.cfg, top_k=top_k, generator=g, compile=c)
                if lg is not None:
                    def run_lg():
                        with torch.no_grad():
                            return lg_generate(lg, labels, L, cfg_scale=args.cfg, cfg_interval=-1, temperature=1.0,
                                               top_k=args.top_k, top_p=1.0, sample_logits=True)
                    cells[("eager", "LlamaGen")] = run_lg
                    # same weights, same model: greedy tokens must agree (a wrong twin would make timings moot)
                    with torch.no_grad():
                        a = generate(model, labels, guidance_scale=args.cfg, top_k=1).flatten(1)
                        b = lg_generate(lg, labels, L, cfg_scale=args.cfg, cfg_interval=-1, top_k=1, top_p=1.0,
                                        sample_logits=False)
                    agree = (a == b.to(a.dtype)).float().mean().item()
                    print(f"  greedy tokens ours vs LlamaGen (B={B}): {100 * agree:.1f}% equal")
                for fn in cells.values():  # warm-up: compile / capture / allocate
                    fn()
                wall = {k: [] for k in cells}
                cput = {k: [] for k in cells}
                for _ in range(args.repeats):
                    for k, fn in cells.items():
                        _sync(device)
                        t0, c0 = time.perf_counter(), time.thread_time()
                        fn()
                        _sync(device)
                        wall[k].append(time.perf_counter() - t0)
                        cput[k].append(time.thread_time() - c0)
                for (mode, who), ts in wall.items():
                    s = statistics.median(ts)
                    r = [preset if who == "ours" else f"{preset} (LlamaGen)", f"{model.num_parameters() / 1e6:.3g}M",
                         head, B, mode, f"{s:.3g}", f"{1e3 * s / L:.3g}", f"{B / s:.3g}", f"{1e3 * floor:.3g}",
                         f"{100 * floor / (s / L):.0f}%"]
                    if cpu:
                        r.append(f"{1e3 * statistics.median(cput[(mode, who)]) / L:.3g}")
                    rows.append(r)
                    print("  " + " | ".join(map(str, r)), flush=True)
                if lg is not None:
                    for mode in args.modes:
                        for what, d in (("wall", wall), ("CPU", cput) if cpu else (None, None)):
                            if what is None:
                                continue
                            ratio = statistics.median(d[("eager", "LlamaGen")]) / statistics.median(d[(mode, "ours")])
                            print(f"  B={B}: LlamaGen / ours ({mode}) {what} time = {ratio:.2f}x")
                if args.profile:
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                    for (mode, who), fn in cells.items():
                        if mode != "eager":
                            continue
                        with profile(activities=acts) as prof:
                            fn()
                        print(f"\nprofile: {who} eager generate(), {preset} B={B} (self time, top ops)")
                        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            del model, lg

    print(f"\n| {' | '.join(cols)} |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print(f"| {' | '.join(map(str, r))} |")


if __name__ == "__main__":
    main()
