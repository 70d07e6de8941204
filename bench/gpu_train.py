"""GPT training throughput on one device under DeepSpeed ZeRO-2 (one process, bf16 on GPUs): tokens/s, MFU and peak
memory per batch size, with and without each speed change, on the trainer's own path.

The trainer's path: GPT.from_preset -> generator.perf.optimize_for_training(compile=, checkpointing=) (what
generator.train's TrainConfig `compile` / `activation_checkpointing` call) -> runtime.optim.build_adamw (fused
AdamW when allowed) -> generator.train.LossModule under deepspeed.initialize; FLOPs from GPT.flops_per_token().
Needs only torch + deepspeed + this checkout (no accelerate, no data: random codes). Defaults: GPT-XXL (1.4B) with
the MGVQ generator layout (projector input over G=8 sub-codebooks of K=2048, AR head), 16x16 grid (256 px / f16).
A config that runs out of memory is listed as OOM; configs past --time-budget are listed as skipped.

Configs (--configs, comma separated; each is a name from CONFIGS below):
  base       eager, no checkpointing, unfused AdamW      (the trainer under DeepSpeed before issue 13)
  ckpt       eager, full checkpointing, unfused
  fused      + fused AdamW (torch's one-kernel AdamW on DeepSpeed's fp32 partitions)
  compile    + regional torch.compile of every block
  selective  + "selective" activation checkpointing (keep matmul/attention outputs, recompute the rest)
  alternate  + "full" checkpointing on every other block
  full       + "full" checkpointing

    python bench/gpu_train.py                                        # H100 / H200: GPT-XXL table
    python bench/gpu_train.py --preset GPT-tiny --device cpu --steps 2 --warmup 1 --batch-sizes 2 --groups 2 \\
        --codebook-size 64 --grid 4 --configs base,compile,selective          # CPU smoke (about a minute)
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # bf16 dense

CONFIGS = {  # name: (compile, activation checkpointing, fused AdamW)
    "base": (False, "none", False),
    "ckpt": (False, "full", False),
    "fused": (False, "none", True),
    "compile": (True, "none", True),
    "selective": (True, "selective", True),
    "alternate": (True, "alternate", True),
    "full": (True, "full", True),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="GPT-XXL")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-sizes", default="16,32,64", help="per-device micro-batches (comma separated)")
    p.add_argument("--configs", default="base,fused,compile,selective,full",
                   help=f"comma separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--codebook-size", type=int, default=2048)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-mode", default="projector", choices=["sum", "projector"])
    p.add_argument("--head", default="ar", choices=["parallel", "ar"])
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU name (bf16 dense)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; configs past it are skipped")
    args = p.parse_args(argv)
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {bad}; valid: {', '.join(CONFIGS)}")
    return args


def main(argv=None):
    args = parse(argv)
    t_start = time.perf_counter()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # one process without a launcher (else DeepSpeed tries MPI discovery)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    import deepspeed
    from generator.model import GPT
    from generator.perf import attention_kernels, optimize_for_training
    from generator.train import LossModule
    from runtime.optim import build_adamw

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False (use --device cpu for a smoke test)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    G, K, grid = args.groups, args.codebook_size, args.grid
    L = grid * grid
    codebook = None
    if args.input_mode == "projector":
        codebook = torch.randn(G, K, 32 // G if 32 % G == 0 else 4, generator=torch.Generator().manual_seed(0))
    model_kw = dict(groups=G, codebook_size=K, grid=grid, num_classes=args.num_classes, input_mode=args.input_mode,
                    head=args.head, codebook_embed_dim=(codebook.shape[-1] * G if codebook is not None else 32))
    rows, kernels_seen = [], {}
    print(f"device: {name} | peak {peak} TFLOP/s | {args.preset} G={G} K={K} grid={grid} input={args.input_mode} "
          f"head={args.head} | ZeRO-{args.zero} {'bf16' if bf16 else 'fp32'} | torch {torch.__version__} "
          f"deepspeed {deepspeed.__version__}", flush=True)
    for cname in args.configs.split(","):
        compile_, ckpt, fused = CONFIGS[cname]
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            if time.perf_counter() - t_start > args.time_budget:
                rows.append((cname, b, "skipped (time budget)"))
                continue
            engine = model = opt = None
            try:
                with torch.device(device):
                    model = GPT.from_preset(args.preset, codebook=codebook, **model_kw)
                optimize_for_training(model, compile=compile_, checkpointing=ckpt)  # what the trainer calls
                n_params = model.num_parameters()
                fps = model.flops_per_token() * L
                opt = build_adamw(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95), allow_fused=fused)
                ds_config = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1,
                             "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
                             "zero_optimization": {"stage": args.zero, "overlap_comm": True,
                                                   "contiguous_gradients": True, "reduce_bucket_size": 50_000_000,
                                                   "allgather_bucket_size": 50_000_000,
                                                   "stage3_prefetch_bucket_size": 50_000_000,
                                                   "stage3_param_persistence_threshold": 100_000},
                             "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
                engine, _, _, _ = deepspeed.initialize(model=LossModule(model), optimizer=opt, config=ds_config)
                gen = torch.Generator(device=device).manual_seed(0)
                codes = torch.randint(K, (b, grid, grid, G), device=device, generator=gen)
                labels = torch.randint(args.num_classes, (b,), device=device, generator=gen)
                if compile_ not in kernels_seen:  # which SDPA kernels run (flash expected in bf16 on the GPU)
                    kernels_seen[compile_] = attention_kernels(lambda: engine(codes, labels))
                    print(f"  SDPA kernels ({'compiled' if compile_ else 'eager'}): "
                          f"{', '.join(kernels_seen[compile_]) or 'none found'}", flush=True)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                for i in range(args.warmup + args.steps):
                    if i == args.warmup:
                        if cuda:
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                    loss, _ = engine(codes, labels)
                    engine.backward(loss)
                    engine.step()
                if cuda:
                    torch.cuda.synchronize(device)
                dt = (time.perf_counter() - t0) / args.steps
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
                tflops = fps * b / dt / 1e12
                rows.append((cname, b, dict(params=n_params, step_s=dt, tok_s=b * L / dt, tflops=tflops,
                                            mfu=tflops / peak if peak else None, mem=mem,
                                            loss=float(loss.detach()))))
            except torch.OutOfMemoryError:
                rows.append((cname, b, "OOM"))
            finally:
                if engine is not None and hasattr(engine, "destroy"):
                    engine.destroy()
                engine = model = opt = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            r = rows[-1][2]
            print(f"  {cname:<9} batch {b:4d}: "
                  + (r if isinstance(r, str) else f"{r['tok_s']:.0f} tokens/s, {r['tflops']:.2f} TFLOP/s, "
                     f"mem {r['mem']:.1f} GiB, loss {r['loss']:.3f}"), flush=True)

    n = next((r[2]["params"] for r in rows if isinstance(r[2], dict)), 0)
    print(f"\n{args.preset} ({n / 1e6:.2f}M params) training step = fwd + bwd + AdamW, DeepSpeed ZeRO-{args.zero}, "
          f"1 device ({name})")
    print("| config | compile | act. ckpt | fused AdamW | batch/device | step (s) | tokens/s | TFLOP/s | MFU | "
          "peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cname, b, r in rows:
        c, a, f = CONFIGS[cname]
        head = f"| {cname} | {'on' if c else 'off'} | {a} | {'on' if f else 'off'} | {b} |"
        if isinstance(r, str):
            print(f"{head} {r} | | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{head} {r['step_s']:.3f} | {r['tok_s']:.0f} | {r['tflops']:.2f} | {mfu} | {r['mem']:.1f} |")
    print(f"(tokens = image positions, L={L}; FLOPs = GPT.flops_per_token() x L per sequence; SDPA kernels: "
          f"{kernels_seen}; total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
