"""GPT training throughput on one device under DeepSpeed ZeRO-2 (one process, bf16 on GPUs): tokens/s and MFU.

Needs only torch + deepspeed + this checkout (no accelerate, no data: random codes). Defaults: GPT-XXL (1.4B) with
the MGVQ generator layout (projector input over G=8 sub-codebooks of K=2048, AR head), 16x16 grid (256 px / f16),
per-device batches 16/32/64 with and without activation checkpointing; a config that runs out of memory is listed
as OOM. Total time is bounded by --time-budget (default 270 s); configs past it are skipped.

    python bench/gpu_train.py                                        # H100 / H200: GPT-XXL table
    python bench/gpu_train.py --preset GPT-tiny --device cpu --steps 2 --batch-sizes 2 --groups 2 --codebook-size 64 --grid 8
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


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="GPT-XXL")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-sizes", default="16,32,64", help="per-device micro-batches (comma separated)")
    p.add_argument("--grad-checkpointing", default="off,on", help="off, on or off,on")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--codebook-size", type=int, default=2048)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-mode", default="projector", choices=["sum", "projector"])
    p.add_argument("--head", default="ar", choices=["parallel", "ar"])
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU name (bf16 dense)")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds; configs past it are skipped")
    return p.parse_args()


def main():
    args = parse()
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
    from generator.train import LossModule

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
    rows = []
    print(f"device: {name} | peak {peak} TFLOP/s | {args.preset} G={G} K={K} grid={grid} input={args.input_mode} "
          f"head={args.head} | ZeRO-{args.zero} {'bf16' if bf16 else 'fp32'} | torch {torch.__version__} "
          f"deepspeed {deepspeed.__version__}", flush=True)
    for gc_on in [v.strip() == "on" for v in args.grad_checkpointing.split(",")]:
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            if time.perf_counter() - t_start > args.time_budget:
                rows.append((b, gc_on, "skipped (time budget)"))
                continue
            engine = model = None
            try:
                with torch.device(device):
                    model = GPT.from_preset(args.preset, codebook=codebook, grad_checkpointing=gc_on, **model_kw)
                n_params = model.num_parameters()
                fps = model.flops_per_token() * model.config.block_size
                opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
                ds_config = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1,
                             "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
                             "zero_optimization": {"stage": args.zero, "overlap_comm": True,
                                                   "contiguous_gradients": True, "reduce_bucket_size": 50_000_000,
                                                   "allgather_bucket_size": 50_000_000,
                                                   "stage3_prefetch_bucket_size": 50_000_000,
                                                   "stage3_param_persistence_threshold": 100_000},
                             "steps_per_print": 10**9}
                engine, _, _, _ = deepspeed.initialize(model=LossModule(model), optimizer=opt, config=ds_config)
                gen = torch.Generator(device=device).manual_seed(0)
                codes = torch.randint(K, (b, grid, grid, G), device=device, generator=gen)
                labels = torch.randint(args.num_classes, (b,), device=device, generator=gen)
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
                rows.append((b, gc_on, dict(params=n_params, step_s=dt, tok_s=b * L / dt, seq_s=b / dt,
                                            tflops=tflops, mfu=tflops / peak if peak else None, mem=mem,
                                            loss=float(loss.detach()))))
            except torch.OutOfMemoryError:
                rows.append((b, gc_on, "OOM"))
            finally:
                if engine is not None and hasattr(engine, "destroy"):
                    engine.destroy()
                engine = model = opt = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            r = rows[-1][2]
            print(f"  batch {b:4d} ckpt {'on ' if gc_on else 'off'}: "
                  + (r if isinstance(r, str) else f"{r['tok_s']:.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, "
                     f"mem {r['mem']:.1f} GiB, loss {r['loss']:.3f}"), flush=True)

    print(f"\n{args.preset} ({next((r[2]['params'] for r in rows if isinstance(r[2], dict)), 0) / 1e6:.2f}M params) "
          f"training step = fwd + bwd + AdamW, DeepSpeed ZeRO-{args.zero}, 1 device ({name})")
    print("| batch/device | act. ckpt | step (s) | tokens/s | seqs/s | TFLOP/s | MFU | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for b, gc_on, r in rows:
        if isinstance(r, str):
            print(f"| {b} | {'on' if gc_on else 'off'} | {r} | | | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"| {b} | {'on' if gc_on else 'off'} | {r['step_s']:.3f} | {r['tok_s']:.0f} | {r['seq_s']:.1f} | "
                  f"{r['tflops']:.1f} | {mfu} | {r['mem']:.1f} |")
    print(f"(tokens = image positions, L={L}; FLOPs = 6 x matmul params x tokens + attention, AR head on G+1 tokens; "
          f"total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
