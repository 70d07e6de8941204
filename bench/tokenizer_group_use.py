"""Which sub-tokens does a trained MGVQ decoder actually use? A knock-out table per group.

For every group g of a trained tokenizer, on held-out images: the entropy of its indices (bits; log2 K = every code
equally often) and the PSNR lost when group g's indices are replaced by uniformly random codes while all other groups
keep theirs. A group can have 100 % codebook usage and high entropy yet cost ~0 dB when randomised: the decoder then
ignores it (its codes carry no information the decoder uses). Prints one table.

    python bench/tokenizer_group_use.py runs/bench-tokenizer-groups/seed0/{g8,g8-nested}/final      # scikit-image crops
    python bench/tokenizer_group_use.py runs/demo/tokenizer/final --data fashion-mnist             # the demo's tokenizer
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import psnr_of_mean_mse  # noqa: E402
from tokenizer import MGVQTokenizer  # noqa: E402


@functools.lru_cache(maxsize=4)  # several tokenizers of one size share one image set
def held_out_images(data: str, n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, S, S) in [-1, 1]: scikit-image crops (tokenizer_groups.py's held-out set) or the Fashion-MNIST test split."""
    if data == "skimage":
        from tokenizer.data import skimage_crops

        x = torch.from_numpy(skimage_crops(n, size, seed=10_000 + seed)[0]).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1
    from pipelines import demo as D

    x, _, _ = D.load_split(D.find_data(None), "test", None)
    return D.to_model(x[:n])


def psnr(recon: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR of the dataset-mean MSE (the ablation's convention) of images in [-1, 1]."""
    return psnr_of_mean_mse(((recon.clamp(-1, 1) + 1) / 2).numpy(), ((x + 1) / 2).numpy())


@torch.no_grad()
def group_use(tok: MGVQTokenizer, x: torch.Tensor, seed: int = 0, batch: int = 512) -> dict:
    tok.eval()
    G, K = tok.config.groups, tok.config.codebook_size
    idx = torch.cat([tok.encode(x[i:i + batch]) for i in range(0, len(x), batch)])  # (N, h, w, G)

    def decode_psnr(codes):
        return psnr(torch.cat([tok.decode(codes[i:i + batch]) for i in range(0, len(codes), batch)]), x)

    full = decode_psnr(idx)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for j in range(G):
        p = torch.bincount(idx[..., j].flatten(), minlength=K).float()
        p = p[p > 0] / p.sum()
        knocked = idx.clone()
        knocked[..., j] = torch.randint(0, K, knocked[..., j].shape, generator=g)
        rows.append({"group": j + 1, "entropy_bits": float(-(p * p.log2()).sum()),
                     "psnr_drop": full - decode_psnr(knocked)})
    return {"psnr": full, "groups": rows, "max_bits": math.log2(K)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizers", nargs="+", help="MGVQTokenizer.save_pretrained folders")
    ap.add_argument("--data", default="skimage", choices=["skimage", "fashion-mnist"])
    ap.add_argument("--num-images", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="held-out crop seed (skimage) and knock-out RNG seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--live-db", type=float, default=0.1, help="a group counts as used if randomising it costs this much")
    args = ap.parse_args(argv)
    if args.num_images < 1:
        ap.error(f"--num-images={args.num_images}: must be >= 1")
    torch.set_num_threads(args.threads)
    print("PSNR lost when one group's indices are randomised (dB) / entropy of its indices (bits)")
    for path in args.tokenizers:
        tok = MGVQTokenizer.from_pretrained(path)
        if not tok.is_quantized:
            print(f"{path}: continuous (quantizer={tok.config.quantizer!r}), no groups")
            continue
        x = held_out_images(args.data, args.num_images, tok.config.image_size, args.seed)
        r = group_use(tok, x, seed=args.seed)
        cells = "  ".join(f"g{c['group']} {c['psnr_drop']:5.2f} / {c['entropy_bits']:.1f}" for c in r["groups"])
        live = sum(c["psnr_drop"] >= args.live_db for c in r["groups"])
        print(f"{path}: PSNR {r['psnr']:.2f} dB, log2 K = {r['max_bits']:.0f} bits, {live}/{len(r['groups'])} groups "
              f"cost >= {args.live_db} dB when randomised\n    {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
