"""Cost of the stage-one cache over bare encoding: `cache-codes` images/s vs `tok.encode` images/s, same batch size.

    python bench/cache_codes.py              # CPU: mgvq-tiny (random init), Fashion-MNIST, 512 images
    python bench/cache_codes.py --preset mgvq-f16-g8 --image-size 256 --data synthetic-jpeg --images 4096 \
        --batch-size 64 --num-workers 12 --precision bf16            # GPU: real-size tokenizer on JPEG files

Bare encode: the same V views of the same images, already decoded, cropped and on the device as floats; one
`tok.encode` call per batch of batch_size * V views. Cache: the full `tokenizer.cache_codes` loop (DataLoader decode +
crops in workers, transfer, encode, cast, Parquet shard writes), timed from its first batch to its last shard.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer import MGVQTokenizer  # noqa: E402
from tokenizer.cache_codes import (_collate, _ViewsDataset, make_views, open_source, run,  # noqa: E402
                                   to_model_input, view_names)


def synthetic_jpegs(root: str, n: int, seed: int = 0, classes: int = 10) -> None:
    """ImageNet-like files: n smooth random JPEGs of 300-500 px per side in `classes` folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(d, exist_ok=True)
        h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mgvq-tiny")
    p.add_argument("--tokenizer", default=None, help="a save_pretrained folder instead of a random-init preset")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist",
                   help="as cache-codes --data (default: the Fashion-MNIST IDX folder), or 'synthetic-jpeg'")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--views", default="flip")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--shard-size", type=int, default=4096)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp(prefix="bench_cache_codes_")

    tok_dir = a.tokenizer
    if tok_dir is None:
        torch.manual_seed(0)
        tok_dir = os.path.join(tmp, "tok")
        MGVQTokenizer.from_preset(a.preset, **({"image_size": a.image_size} if a.image_size else {})) \
            .save_pretrained(tok_dir)
    tok = MGVQTokenizer.from_pretrained(tok_dir, device=device).eval()
    S = a.image_size or tok.config.image_size
    data = a.data
    if data == "synthetic-jpeg":
        data = os.path.join(tmp, "jpeg")
        t = time.perf_counter()
        synthetic_jpegs(data, a.images)
        print(f"wrote {a.images} synthetic JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    V = len(view_names(a.views))

    # ---- bare encode on pre-decoded views, same batch size ----
    source, _ = open_source(data, "train")
    n = min(a.images, len(source))
    views = torch.from_numpy(np.stack([make_views(source.decode(i), S, a.views) for i in range(n)]))
    x = to_model_input(views.flatten(0, 1)).to(device)  # (n * V, 3, S, S)
    step = a.batch_size * V
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if a.precision == "bf16" else \
        (lambda: torch.autocast(device.type, enabled=False))
    with ac():
        tok.encode(x[:step])  # warm-up (cuDNN autotune, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, len(x), step):
            tok.encode(x[s:s + step])
        if device.type == "cuda":
            torch.cuda.synchronize()
    enc_s = time.perf_counter() - t
    del x

    # ---- the input pipeline alone: decode + crops in DataLoader workers ----
    loader = torch.utils.data.DataLoader(_ViewsDataset(source, S, a.views), batch_size=a.batch_size,
                                         num_workers=a.num_workers, collate_fn=_collate, sampler=range(n))
    t = time.perf_counter()
    for _ in loader:
        pass
    data_s = time.perf_counter() - t

    # ---- the cache: full cache_codes loop on the same images ----
    t = time.perf_counter()
    stats = run(tokenizer=tok_dir, data=data, out=os.path.join(tmp, "out"), image_size=S, batch_size=a.batch_size,
                views=a.views, num_workers=a.num_workers, precision=a.precision, shard_size=a.shard_size, limit=n)
    wall = time.perf_counter() - t
    cache_s = stats["seconds"]

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}; tokenizer {a.preset if a.tokenizer is None else a.tokenizer} at {S}px "
          f"(G={tok.config.groups}, K={tok.config.codebook_size}), views={a.views} (V={V}), batch {a.batch_size} "
          f"images = {step} views, {n} images, {a.precision}, data {a.data}, {a.num_workers} workers")
    print("| path | images/s | views/s | seconds |")
    print("|---|---|---|---|")
    print(f"| bare tok.encode (pre-decoded, on device) | {n / enc_s:.1f} | {n * V / enc_s:.1f} | {enc_s:.2f} |")
    print(f"| input pipeline alone (decode+crop, workers) | {n / data_s:.1f} | {n * V / data_s:.1f} | {data_s:.2f} |")
    print(f"| cache-codes loop (decode+crop+encode+write) | {n / cache_s:.1f} | {n * V / cache_s:.1f} "
          f"| {cache_s:.2f} |")
    steady = cache_s - stats["fill_seconds"]
    print(f"| cache-codes loop minus pipeline fill ({stats['fill_seconds']:.2f} s to the first batch) | "
          f"{n / steady:.1f} | {n * V / steady:.1f} | {steady:.2f} |")
    print(f"| cache-codes incl. startup + finalize | {n / wall:.1f} | {n * V / wall:.1f} | {wall:.2f} |")
    print(f"cache overhead over bare encode: {100 * (cache_s / enc_s - 1):+.1f}% (loop), "
          f"{100 * (steady / enc_s - 1):+.1f}% (loop minus fill), "
          f"{100 * (wall / enc_s - 1):+.1f}% (incl. startup)")


if __name__ == "__main__":
    main()
