"""Multi-group VQ vs a single codebook, same total number of codes, same data, same steps (CPU, a few minutes).

    python bench/tokenizer_groups.py                       # G=4 and G=8 (C=32) vs G=1 (C=8), 1024 codes each
    python bench/tokenizer_groups.py --steps 600 --groups 4 --ch 32 --out runs/bench-groups

Data: random 32x32 crops of the colour photos bundled with scikit-image (astronaut, coffee, chelsea, rocket,
motorcycle, hubble, ...), 4096 for training and 512 held-out crops (another seed) for evaluation. Each model is trained
with tokenizer.train (L2 + Charbonnier + codebook losses; LPIPS / GAN off to keep it short) and evaluated on the
held-out crops: PSNR of the dataset-mean MSE (MGVQ eval_recon convention), codebook usage per group (fraction of the
K codes that encode at least one held-out position), and for the multi-group models PSNR when decoding only the first
k groups (nested masking: coarse to fine). Prints a table and writes <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import MGVQTokenizer  # noqa: E402
from tokenizer.data import skimage_crops  # noqa: E402
from tokenizer.train import main as train_main  # noqa: E402


def psnr_of_mean_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


@torch.no_grad()
def evaluate(tok: MGVQTokenizer, x: torch.Tensor) -> dict:
    tok.eval()
    G, K = tok.config.groups, tok.config.codebook_size
    idx = torch.cat([tok.encode(x[i:i + 128]) for i in range(0, len(x), 128)])  # (N, h, w, G)
    usage = [len(torch.unique(idx[..., g])) / K for g in range(G)]
    per_k = []
    for k in range(1, G + 1):
        rec = torch.cat([tok.decode(idx[i:i + 128], groups_to_use=k) for i in range(0, len(x), 128)])
        per_k.append(psnr_of_mean_mse(rec, x))
    return {"psnr": per_k[-1], "psnr_first_k_groups": per_k, "usage": usage}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="multi-group settings (C=32)")
    ap.add_argument("--total-codes", type=int, default=1024, help="codes per model (K = total / G)")
    ap.add_argument("--baseline-dim", type=int, default=8, help="latent dim C of the single-codebook baseline")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--no-nested", action="store_true", help="train the multi-group models without nested masking")
    ap.add_argument("--reinit-decay", type=float, default=0.1, help="CVQ dead-code EMA rate (reference 0.01)")
    ap.add_argument("--ch", type=int, default=16, help="VQGAN base width (the mgvq-tiny preset's is 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on shared cores)")
    ap.add_argument("--out", default="runs/bench-tokenizer-groups")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    tag = " no-nest" if args.no_nested else ""
    settings = [(f"MGVQ{tag} G={g} C=32 K={args.total_codes // g}",
                 {"groups": g, "latent_dim": 32, "codebook_size": args.total_codes // g}
                 | ({"nested_keep_probs": None} if args.no_nested else {})) for g in args.groups]
    settings.append((f"single codebook G=1 C={args.baseline_dim} K={args.total_codes}",
                     {"groups": 1, "latent_dim": args.baseline_dim, "codebook_size": args.total_codes,
                      "nested_keep_probs": None}))
    held = torch.from_numpy(skimage_crops(512, 32, seed=10_000 + args.seed)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1

    results = []
    for name, ov in settings:
        run = out / name.split(" K=")[0].replace(" ", "_").replace("=", "")
        overrides = [f"model_overrides.{k}={json.dumps(v) if v is not None else 'null'}" for k, v in ov.items()]
        train_main(["model=mgvq-tiny", f"model_overrides.vqgan.ch={args.ch}",
                    f"model_overrides.reinit_decay={args.reinit_decay}", *overrides, "data=skimage",
                    "num_crops=4096", f"steps={args.steps}", f"batch_size={args.batch_size}", f"lr={args.lr}",
                    "mixed_precision=no", "loss.perceptual_weight=0", "loss.disc_weight=0", "log_every=25",
                    f"sample_every={args.steps}", f"save_every={args.steps}", "resume=null", f"seed={args.seed}",
                    f"out_dir={run}"])
        tok = MGVQTokenizer.from_pretrained(str(run / "final"))
        r = evaluate(tok, held) | {"model": name, "params": tok.num_parameters()}
        results.append(r)

    print(f"\n{args.steps} steps, batch {args.batch_size}, lr {args.lr}, VQGAN ch {args.ch}, 32x32 scikit-image crops "
          f"(4096 train / 512 held-out), {args.total_codes} codes per model")
    print(f"{'model':<34} {'params':>8} {'PSNR dB':>8} {'min usage':>9}  usage per group        PSNR first k groups")
    for r in results:
        usage = " ".join(f"{u:.2f}" for u in r["usage"])
        per_k = " ".join(f"{p:.2f}" for p in r["psnr_first_k_groups"])
        print(f"{r['model']:<34} {r['params'] / 1e6:>7.2f}M {r['psnr']:>8.2f} {min(r['usage']):>9.2f}  {usage:<22} {per_k}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
