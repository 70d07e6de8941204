"""`mgvq demo`: the whole system on Fashion-MNIST (32x32 RGB, 10 classes) on a CPU, end to end, into one folder.

    mgvq demo                       # default run (about 15 minutes on 2 CPU cores), writes runs/demo/
    mgvq demo --quick --out /tmp/d  # smoke run (under 2 minutes): fewer steps, a subset of the data
    mgvq demo --text                # text-to-image from captions (pipelines.demo_text), writes runs/demo-text/
    python -m pipelines.demo ...    # same thing

Stages (each through its module's Python API; a rerun into the same --out reuses every stage whose settings did not
change, so an interrupted demo continues where it stopped):
  1. classifier   pipelines.classifier: a small CNN trained on the real training split (evaluation yardstick)
  2. tokenizer    tokenizer.train: MGVQ tokenizer (G=4 sub-codebooks, C=32, f4 -> 8x8 grid of 4 sub-tokens)
  3. codes        tokenizer.cache_codes: every training image's sub-token indices -> Parquet shards + meta.json
  4. generator    generator.train: class-conditional GPT with G parallel per-group heads
  5. pipeline     MGVQPipeline.save_pretrained(<out>/pipeline) (reload with MGVQPipeline.from_pretrained)
  6. evaluation   tokenizer PSNR / SSIM / codebook usage / PSNR per number of groups on the test split; samples for
                  every class with and without CFG scored by the classifier (conditional accuracy, classifier FD)

Outputs in --out: metrics.json, README.md, samples_grid.png (one row per class), reconstructions.png (originals,
then decodes from 1..G groups), loss_curves.png, classifier/, tokenizer/, codes/, generator/, pipeline/.

Honesty note: FID needs Inception weights that are not available offline. "classifier FD" is a Fréchet distance in
the penultimate feature space of the small Fashion-MNIST classifier; it is comparable only within this demo (the
metrics also give real-vs-real and reconstruction-vs-real FDs in the same space as reference points).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

# ---- settings --------------------------------------------------------------------------------------------------------
# Default: fits about 15 minutes on 2 CPU cores. Quick: a smoke test of every stage (under 2 minutes).
PROFILES: dict[str, dict] = {
    "default": dict(
        num_train=None, num_test=None,  # None: all 60000 / 10000 images
        clf_steps=1000, clf_batch=128,
        tok_steps=1500, tok_batch=32, tok_lr=1e-3,
        tok_overrides={"vqgan.ch": 16, "vqgan.ch_mult": [1, 2, 2], "vqgan.num_res_blocks": 1,
                       "vqgan.z_channels": 32, "vqgan.norm_groups": 8},
        cache_limit=None,  # all 60k training images: at 3400+ steps 20k images over-fit (held-out CE +0.07 nats)
        # the generator is what limits the samples: it gets most of the 15 minutes (4500 steps: 379 s on 2 cores;
        # 1400 -> 3400 -> 5000 steps moved accuracy / FD at CFG 2 from 0.83 / 35 to 0.90 / 42 and 0.93 / 37,
        # docs/results.md "How much generator")
        gen_steps=4500, gen_batch=32, gen_lr=2e-3, gen_warmup=50,
        gen_args={"dim": 128, "n_layer": 3, "n_head": 4},
        # sampling: CFG 2.0 + top-k 16 + temperature 0.8: the lowest CFG whose samples reach >= 90% accuracy with this
        # generator (CFG 2.5 costs ~2x the FD for +1 point; bench/demo_heads.py, docs/results.md)
        guidance_scale=2.0, top_k=16, temperature=0.8, eval_per_class=100, tok_eval=2000, grid_cols=10,
    ),
    "quick": dict(
        num_train=2000, num_test=500,
        clf_steps=15, clf_batch=32,
        tok_steps=8, tok_batch=8, tok_lr=1e-3,
        tok_overrides={"vqgan.ch": 8, "vqgan.ch_mult": [1, 2, 2], "vqgan.num_res_blocks": 1,
                       "vqgan.z_channels": 16, "vqgan.norm_groups": 4},
        cache_limit=256,
        gen_steps=8, gen_batch=16, gen_lr=2e-3, gen_warmup=0,
        gen_args={"dim": 32, "n_layer": 1, "n_head": 2},
        guidance_scale=3.0, eval_per_class=3, tok_eval=48, grid_cols=3,
    ),
}
STAGE_FILE = "demo_stage.json"
SECONDS_FILE = "stage_seconds.json"


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ------------------------------------------------------------------------------------------------------------
def find_data(data_dir: str | None) -> Path:
    """The Fashion-MNIST folder: --data-dir, else the Debian package's folder, else the cache (downloaded if online)."""
    from pipelines.fashion_mnist import find_fashion_mnist

    try:
        return find_fashion_mnist(data_dir, download=True)
    except FileNotFoundError as e:
        raise SystemExit(f"mgvq demo: {e}\nInstall it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                         f"or pass --data-dir DIR holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                         f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz") from None


def resize_32(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, size, size), PIL bicubic (the same resize as tokenizer.data's "resize")."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), resample=Image.BICUBIC)) for a in images])


def load_split(path: Path, split: str, limit: int | None, size: int = 32):
    from pipelines.fashion_mnist import load_fashion_mnist

    x, y, names = load_fashion_mnist(split, path, download=False)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return resize_32(x, size), y, names


def to_model(x_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) greyscale -> float (N, 3, H, W) in [-1, 1] (greyscale as RGB, what the tokenizer sees)."""
    t = torch.from_numpy(np.ascontiguousarray(x_uint8)).float().div(127.5).sub(1.0)
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


# ---- stage bookkeeping -----------------------------------------------------------------------------------------------
def stage_done(folder: Path, settings: dict, needs: list[str], reuse_only: bool = False) -> bool:
    """True when `folder` holds a finished stage with exactly these settings; otherwise the folder is cleared
    (`reuse_only`: left alone, and a FileNotFoundError says what is missing or different)."""
    marker = folder / STAGE_FILE
    stored = None
    if marker.is_file() and all((folder / n).exists() for n in needs):
        with open(marker) as f:
            stored = json.load(f)
            if stored == json.loads(json.dumps(settings)):
                return True
    if reuse_only:
        raise FileNotFoundError(f"{folder}: no finished stage with these settings to reuse (stored {stored}, "
                                f"wanted {json.loads(json.dumps(settings))})")
    if folder.exists():
        shutil.rmtree(folder)
    return False


def mark_done(folder: Path, settings: dict, seconds: float | None = None) -> None:
    """Mark a finished stage; `seconds` (its compute time) goes to <folder>/stage_seconds.json, kept on reuse."""
    if seconds is not None:
        (folder / SECONDS_FILE).write_text(json.dumps({"seconds": round(seconds, 1)}))
    with open(folder / STAGE_FILE, "w") as f:
        json.dump(settings, f, indent=2)


def stage_seconds(folder: Path) -> float | None:
    """The compute time a finished stage recorded (None if it recorded none)."""
    path = Path(folder) / SECONDS_FILE
    return json.loads(path.read_text())["seconds"] if path.is_file() else None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# ---- stages ----------------------------------------------------------------------------------------------------------
def train_tokenizer(out: Path, data_path: Path, p: dict, seed: int, reuse_only: bool = False) -> Path:
    """mgvq-tiny + p["tok_overrides"] (any TokenizerConfig fields, dotted keys) -> <out>/tokenizer/final
    (`reuse_only`: an earlier run's finished stage or an error, never training)."""
    from tokenizer.train import TrainConfig, train

    folder = out / "tokenizer"
    settings = {"steps": p["tok_steps"], "batch": p["tok_batch"], "lr": p["tok_lr"], "overrides": p["tok_overrides"],
                "seed": seed, "data": str(data_path)}
    if stage_done(folder, settings, ["final/model.safetensors"], reuse_only):
        _log(f"tokenizer: reusing {folder / 'final'}")
        return folder / "final"
    cfg = TrainConfig(model="mgvq-tiny", model_overrides=dict(p["tok_overrides"]), data=str(data_path),
                      data_split="train", image_size=32, batch_size=p["tok_batch"],
                      steps=p["tok_steps"], lr=p["tok_lr"], weight_decay=0.0,
                      loss={"perceptual_weight": 0.0, "disc_weight": 0.0},  # LPIPS / GAN cost more than they give at 32px
                      precision="fp32", out_dir=str(folder), log_every=10,
                      sample_every=max(p["tok_steps"] // 3, 1), save_every=p["tok_steps"], keep_checkpoints=1,
                      resume="none", log_with="none", seed=seed)
    t0 = time.time()
    train(cfg)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # only final/ is needed downstream
    mark_done(folder, settings, seconds=time.time() - t0)
    return folder / "final"


def cache_codes(out: Path, tok_dir: Path, data_path: Path, p: dict, reuse_only: bool = False) -> Path:
    from pipelines.fashion_mnist import CLASSES
    from runtime.fingerprint import tokenizer_sha256
    from tokenizer import cache_codes as cc

    folder = out / "codes"
    settings = {"tokenizer": tokenizer_sha256(tok_dir), "limit": p["cache_limit"], "data": str(data_path)}
    if stage_done(folder, settings, ["meta.json"], reuse_only):
        _log(f"codes: reusing {folder}")
        return folder
    t0 = time.time()
    cc.run(tokenizer=str(tok_dir), data=str(data_path), split="train", out=str(folder), batch_size=256,
           num_workers=0, shard_size=8192, limit=p["cache_limit"], class_names=CLASSES)
    mark_done(folder, settings, seconds=time.time() - t0)
    return folder


def train_generator(out: Path, codes_dir: Path, tok, p: dict, seed: int, codebook: str | None = None) -> Path:
    """GPT-tiny + p["gen_args"] (default head: parallel, input: sum) on the cached codes -> <out>/generator/final.
    `codebook`: the tokenizer folder, for input_mode="projector" (its frozen code vectors)."""
    from generator.train import TrainConfig, train

    folder = out / "generator"
    with open(codes_dir / "meta.json") as f:
        codes_sha = json.load(f)["tokenizer"]["weights_sha256"]
    settings = {"steps": p["gen_steps"], "batch": p["gen_batch"], "lr": p["gen_lr"], "args": p["gen_args"],
                "seed": seed, "codes": codes_sha}
    if stage_done(folder, settings, ["final/model.safetensors"]):
        _log(f"generator: reusing {folder / 'final'}")
        return folder / "final"
    model_args = {"head": "parallel", **p["gen_args"], "token_dropout_p": 0.0, "resid_dropout_p": 0.0,
                  "ffn_dropout_p": 0.0, "class_dropout_prob": 0.1}
    cfg = TrainConfig(model="GPT-tiny", model_overrides=model_args, data=str(codes_dir), view="random",
                      codebook=codebook, num_workers=0, global_batch_size=p["gen_batch"], batch_size=p["gen_batch"],
                      lr=p["gen_lr"], lr_schedule="cosine", warmup_steps=p["gen_warmup"], min_lr=p["gen_lr"] * 0.05,
                      weight_decay=0.05, steps=p["gen_steps"], precision="fp32", out_dir=str(folder),
                      resume="none", save_every=p["gen_steps"], keep_checkpoints=1, log_every=10, log_with="none",
                      sample_every=0, sample_classes=list(range(10)), sample_cfg_scale=p["guidance_scale"], seed=seed)

    @torch.no_grad()
    def decode_fn(codes):
        return tok.decode(codes.cpu())

    t0 = time.time()
    train(cfg, decode_fn=decode_fn)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    mark_done(folder, settings, seconds=time.time() - t0)
    return folder / "final"


# ---- evaluation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_tokenizer(tok, x_uint8: np.ndarray, batch: int = 250) -> tuple[dict, dict]:
    """Test-set PSNR (both conventions) / SSIM, per-group codebook usage + perplexity, PSNR per groups_to_use."""
    from tqdm.auto import tqdm

    from evaluation.metrics import psnr_mean_of_images, psnr_of_mean_mse, ssim_per_image

    G, K = tok.config.groups, tok.config.codebook_size
    real01 = torch.from_numpy(x_uint8).float()[:, None].div(255).expand(-1, 3, -1, -1)
    counts = torch.zeros(G, K, dtype=torch.long)
    recons = {k: [] for k in range(1, G + 1)}
    for i in tqdm(range(0, len(x_uint8), batch), desc="tokenizer eval", mininterval=1.0):
        x = to_model(x_uint8[i:i + batch])
        idx = tok.encode(x)  # (B, h, w, G)
        for g in range(G):
            counts[g] += torch.bincount(idx[..., g].flatten(), minlength=K)
        for k in range(1, G + 1):
            recons[k].append(((tok.decode(idx, groups_to_use=k) + 1) / 2).clamp(0, 1))
    recons = {k: torch.cat(v) for k, v in recons.items()}
    full = recons[G]
    probs = counts.float() / counts.sum(1, keepdim=True)
    perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum(1))
    u8 = lambda t: (t * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    m = {
        "num_images": int(len(x_uint8)),
        "psnr": psnr_mean_of_images(full.numpy(), real01.numpy()),
        "psnr_of_mean_mse": psnr_of_mean_mse(full.numpy(), real01.numpy()),
        "ssim": float(ssim_per_image(u8(full), u8(real01)).mean()),
        "codebook_usage": [float((c > 0).float().mean()) for c in counts],
        "codebook_perplexity": [float(v) for v in perplexity],
        "psnr_by_groups_to_use": {str(k): psnr_mean_of_images(recons[k].numpy(), real01.numpy())
                                  for k in range(1, G + 1)},
    }
    return m, recons


def save_grid(images01: torch.Tensor, path: Path, ncol: int, row_labels: list[str], scale: int = 2) -> tuple[int, int]:
    """(N, 3, H, W) in [0, 1] -> PNG with `ncol` columns and a label per row (runtime.grid); returns (width, height)."""
    from runtime.grid import save_grid as save, to_uint8

    return save(to_uint8(images01), path, ncol=ncol, scale=scale, row_labels=row_labels)


def plot_losses(path: Path, clf_losses: list[float], tok_log: list[dict], gen_log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    if clf_losses:
        ax[0].plot(np.arange(1, len(clf_losses) + 1), clf_losses, lw=0.6, alpha=0.5, label="per step")
        k = max(len(clf_losses) // 30, 1)
        sm = np.convolve(clf_losses, np.ones(k) / k, mode="valid")
        ax[0].plot(np.arange(k, len(clf_losses) + 1), sm, lw=1.5, label=f"mean of {k}")
        ax[0].legend()
    ax[0].set(title="classifier cross-entropy", xlabel="step", yscale="log")
    if tok_log:
        s = [r["step"] for r in tok_log]
        for key in ("total", "l2", "charbonnier", "vq", "commit"):
            if key in tok_log[0]:
                ax[1].plot(s, [r[key] for r in tok_log], label=key)
        ax[1].legend()
        ax[2].plot(s, [r["psnr"] for r in tok_log], label="train batch PSNR (nested-masked)")
        ax[2].legend()
    ax[1].set(title="tokenizer losses", xlabel="step", yscale="log")
    ax[2].set(title="tokenizer PSNR (dB)", xlabel="step")
    if gen_log:
        s = [r["step"] for r in gen_log]
        ax[3].plot(s, [r["loss"] for r in gen_log], lw=2, label="mean")
        for g in range(len(gen_log[0]["group_losses"])):
            ax[3].plot(s, [r["group_losses"][g] for r in gen_log], lw=0.8, label=f"group {g}")
        ax[3].legend()
    ax[3].set(title="generator cross-entropy (nats)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_readme(out: Path, metrics: dict) -> None:
    t, g, c = metrics["tokenizer"], metrics["generation"], metrics["classifier"]
    names = metrics["class_names"]
    lines = [
        "# mgvq demo: Fashion-MNIST 32x32, end to end on a CPU", "",
        f"Profile `{metrics['profile']}`, seed {metrics['seed']}, total {metrics['timings_s']['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in metrics['timings_s'].items() if k != 'total')}).", "",
        "## Files",
        "- `samples_grid.png`: class-conditional samples, one row per class (top to bottom): "
        + ", ".join(f"{i} {n}" for i, n in enumerate(names)) + f"; CFG scale {g['guidance_scale']}",
        "- `reconstructions.png`: row 1 test originals, rows 2.. decodes from the first 1, 2, ..., G groups (labelled)",
        "- `loss_curves.png`, `metrics.json`, `pipeline/` (`MGVQPipeline.from_pretrained`)", "",
        "## Numbers",
        f"- tokenizer (test, {t['num_images']} images): PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.3f}, "
        f"PSNR by groups used: " + ", ".join(f"{k}: {v:.2f}" for k, v in t["psnr_by_groups_to_use"].items())
        + f"; codebook usage per group {[round(u, 3) for u in t['codebook_usage']]}",
        f"- classifier (small CNN, test accuracy {c['test_accuracy']:.4f}) on {g['num_samples']} samples "
        f"({g['per_class']} per class):",
        f"  - conditional accuracy: {g['cond_accuracy_cfg']:.3f} with CFG {g['guidance_scale']}, "
        f"{g['cond_accuracy_no_cfg']:.3f} without (guidance 1.0)",
        f"  - classifier FD (lower is better): {g['classifier_fd_cfg']:.2f} with CFG, {g['classifier_fd_no_cfg']:.2f} "
        f"without; references: real train vs real test {g['classifier_fd_real_vs_real']:.2f}, tokenizer "
        f"reconstructions vs real test {g['classifier_fd_recon_vs_real']:.2f}",
        "", "FID is not reported: its Inception weights are not available offline. The classifier FD is comparable "
        "only inside this demo.", "",
        "```python",
        "from pipelines import MGVQPipeline",
        f"pipe = MGVQPipeline.from_pretrained({str(out / 'pipeline')!r})",
        "images = pipe(['Sneaker', 'Bag'], num_images_per_label=4).images  # PIL images",
        "```", ""]
    (out / "README.md").write_text("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgvq demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  mgvq demo\n  mgvq demo --quick --out /tmp/mgvq-demo\n"
                                       "  mgvq demo --data-dir ~/data/fashion-mnist --out runs/demo2 --seed 1")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo; with --text runs/demo-text)")
    p.add_argument("--text", action="store_true", help="text-to-image from captions (class names, synonyms, "
                                                       "templates) through a T5 encoder: pipelines.demo_text")
    p.add_argument("--t5", default=None, help="--text: a T5 / FLAN-T5 folder or hub id instead of the random tiny T5")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps on a data subset (under 2 minutes)")
    p.add_argument("--data-dir", default=None, help="folder with the 4 Fashion-MNIST IDX files (.gz or not); default: "
                                                    "/usr/share/datasets/fashion-mnist, else ~/.cache/mgvq (downloaded)")
    p.add_argument("--device", default="cpu", help="torch device for training and sampling (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core); 1 is much faster when other "
                        "jobs share the cores (OpenMP threads then wait on each other)")
    return p


class _Timer:
    def __init__(self):
        self.start, self.timings = time.time(), {}

    def tick(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        _log(f"{name}: {self.timings[name]:.1f} s")


def sample_and_score(pipe, clf, names: list[str], x_train, x_test, recon01, p: dict, seed: int, device: str,
                     out: Path, timer: _Timer) -> tuple[dict, tuple[int, int]]:
    """Samples for every class with and without CFG, scored by the classifier; samples_grid.png (a row per class)."""
    from pipelines.classifier import classifier_fd, predict

    t0 = time.time()
    per_class = p["eval_per_class"]
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    gen = {}
    for tag, s in (("cfg", p["guidance_scale"]), ("no_cfg", 1.0)):
        g = torch.Generator(device).manual_seed(seed)
        _log(f"sampling {len(labels)} images, guidance {s}")
        gen[tag] = pipe(labels, guidance_scale=s, generator=g, output_type="pt", batch_size=500).images
    timer.tick("sampling", t0)
    t0 = time.time()
    y = torch.tensor(labels)
    grid = torch.cat([gen["cfg"][y == c][:p["grid_cols"]] for c in range(len(names))])
    grid_size = save_grid(grid, out / "samples_grid.png", ncol=p["grid_cols"], row_labels=names)
    _, real_feats = predict(clf, x_test)
    _, train_feats = predict(clf, x_train[:len(labels)])
    _, recon_feats = predict(clf, recon01)
    generation = {"guidance_scale": p["guidance_scale"], "num_samples": len(labels), "per_class": per_class,
                  "sampling": {"temperature": p.get("temperature", 1.0), "top_k": p.get("top_k"), "top_p": None}}
    for tag, imgs in gen.items():
        logits, feats = predict(clf, imgs)
        generation[f"cond_accuracy_{tag}"] = float((logits.argmax(-1) == y).float().mean())
        generation[f"per_class_accuracy_{tag}"] = {
            names[c]: float((logits.argmax(-1)[y == c] == c).float().mean()) for c in range(len(names))}
        generation[f"classifier_fd_{tag}"] = classifier_fd(real_feats, feats)
    generation["classifier_fd_real_vs_real"] = classifier_fd(real_feats, train_feats)
    generation["classifier_fd_recon_vs_real"] = classifier_fd(real_feats, recon_feats)
    timer.tick("eval_generation", t0)
    _log(f"conditional accuracy {generation['cond_accuracy_cfg']:.3f} (CFG {p['guidance_scale']}) / "
         f"{generation['cond_accuracy_no_cfg']:.3f} (no CFG); classifier FD {generation['classifier_fd_cfg']:.2f} / "
         f"{generation['classifier_fd_no_cfg']:.2f} (real vs real {generation['classifier_fd_real_vs_real']:.2f})")
    return generation, grid_size


def reconstruct_and_score(tok, x_test, p: dict, ncol: int, out: Path, timer: _Timer) -> tuple[dict, dict, tuple]:
    """Tokenizer metrics on the test split; reconstructions.png (originals, then the first 1..G groups)."""
    from runtime.grid import reconstruction_labels

    t0 = time.time()
    tok_metrics, recons = evaluate_tokenizer(tok, x_test[:min(p["tok_eval"], len(x_test))])
    _log(f"tokenizer test PSNR {tok_metrics['psnr']:.2f} dB, SSIM {tok_metrics['ssim']:.3f}, by groups "
         f"{ {k: round(v, 2) for k, v in tok_metrics['psnr_by_groups_to_use'].items()} }, usage "
         f"{[round(u, 3) for u in tok_metrics['codebook_usage']]}")
    real01 = torch.from_numpy(x_test[:ncol]).float()[:, None].div(255).expand(-1, 3, -1, -1)
    rows = [real01] + [recons[k][:ncol] for k in sorted(recons)]
    size = save_grid(torch.cat(rows), out / "reconstructions.png", ncol=ncol,
                     row_labels=reconstruction_labels(len(recons)))
    timer.tick("eval_tokenizer", t0)
    return tok_metrics, recons, size


def collect_metrics(args, profile: str, p: dict, out: Path, data_path: Path, sizes: dict, pieces: dict) -> dict:
    """metrics.json content (also the README's numbers)."""
    tok, pipe, clf_info, timer = pieces["tok"], pieces["pipe"], pieces["clf_info"], pieces["timer"]
    tok_log = read_jsonl(out / "tokenizer" / "metrics.jsonl")
    gen_log = read_jsonl(out / "generator" / "metrics.jsonl")
    plot_losses(out / "loss_curves.png", clf_info.get("losses", []), tok_log, gen_log)
    timer.timings["total"] = round(time.time() - timer.start, 1)
    with open(pieces["gen_dir"] / "train_summary.json") as f:
        gen_summary = json.load(f)
    gcfg = pipe.generator.config
    return {
        "profile": profile, "seed": args.seed, "device": args.device, "torch_threads": torch.get_num_threads(),
        "data": {"path": str(data_path), "num_train": pieces["num_train"], "num_test": pieces["num_test"],
                 "image_size": 32, "num_cached_codes": _num_codes(pieces["codes_dir"])},
        "class_names": pieces["names"],
        "classifier": {"test_accuracy": clf_info["test_accuracy"], "steps": p["clf_steps"],
                       "final_train_loss": clf_info.get("final_loss"), "cached": clf_info["cached"]},
        "tokenizer": {**pieces["tok_metrics"], "groups": tok.config.groups, "codebook_size": tok.config.codebook_size,
                      "latent_dim": tok.config.latent_dim, "downsample": tok.config.downsample,
                      "num_parameters": tok.num_parameters(), "steps": p["tok_steps"],
                      "final_train": {k: tok_log[-1][k] for k in ("total", "psnr", "usage")
                                      if tok_log and k in tok_log[-1]}},
        "generator": {"num_parameters": pipe.generator.num_parameters(),
                      "config": {k: getattr(gcfg, k) for k in ("dim", "n_layer", "n_head", "groups", "codebook_size",
                                                               "grid", "head", "input_mode")},
                      "steps": p["gen_steps"], "final_loss": gen_log[-1]["loss"] if gen_log else None,
                      "final_eval_loss": gen_summary.get("final_eval_loss")},
        "generation": pieces["generation"],
        "outputs": {"samples_grid": "samples_grid.png", "samples_grid_size": list(sizes["samples"]),
                    "reconstructions": "reconstructions.png", "reconstructions_size": list(sizes["recon"]),
                    "loss_curves": "loss_curves.png", "pipeline": "pipeline"},
        "timings_s": timer.timings,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.t5 and not args.text:
        raise SystemExit("--t5 is for --text")
    args.out = args.out or ("runs/demo-text" if args.text else "runs/demo")
    if args.text:
        from pipelines import demo_text

        return demo_text.run(args)
    if args.device != "cpu":
        # the training stages pick their device through accelerate; only sampling / evaluation use --device directly
        torch.device(args.device)  # raises on a malformed device string
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads={args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    profile = "quick" if args.quick else "default"
    p, out, timer = PROFILES[profile], Path(args.out), _Timer()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    data_path = find_data(args.data_dir)
    _log(f"Fashion-MNIST from {data_path}")
    x_train, y_train, names = load_split(data_path, "train", p["num_train"])
    x_test, y_test, _ = load_split(data_path, "test", p["num_test"])
    timer.tick("data", t0)

    from pipelines.classifier import load_or_train  # 1. classifier

    t0 = time.time()
    clf, clf_info = load_or_train(str(out / "classifier"), x_train, y_train, x_test, y_test, steps=p["clf_steps"],
                                  batch_size=p["clf_batch"], seed=args.seed)
    _log(f"classifier test accuracy {clf_info['test_accuracy']:.4f}{' (cached)' if clf_info['cached'] else ''}")
    timer.tick("classifier", t0)
    t0 = time.time()
    tok_dir = train_tokenizer(out, data_path, p, args.seed)  # 2. tokenizer
    from tokenizer import MGVQTokenizer

    tok = MGVQTokenizer.from_pretrained(str(tok_dir)).eval()
    timer.tick("tokenizer", t0)
    t0 = time.time()
    codes_dir = cache_codes(out, tok_dir, data_path, p)  # 3. codes
    timer.tick("cache_codes", t0)
    t0 = time.time()
    gen_dir = train_generator(out, codes_dir, tok, p, args.seed)  # 4. generator
    timer.tick("generator", t0)

    from generator import GPT  # 5. pipeline
    from pipelines import MGVQPipeline

    pipe = MGVQPipeline(tok, GPT.from_pretrained(str(gen_dir)), id2label=names,
                        sampling_defaults={"guidance_scale": p["guidance_scale"], "top_k": p.get("top_k"),
                                           "temperature": p.get("temperature", 1.0)})
    pipe.save_pretrained(str(out / "pipeline"))
    pipe = MGVQPipeline.from_pretrained(str(out / "pipeline")).to(args.device)

    # 6. evaluation
    tok_metrics, recons, recon_size = reconstruct_and_score(pipe.tokenizer.cpu(), x_test, p,
                                                            10 if not args.quick else 8, out, timer)
    pipe.to(args.device)
    generation, grid_size = sample_and_score(pipe, clf, names, x_train, x_test, recons[max(recons)], p, args.seed,
                                             args.device, out, timer)
    metrics = collect_metrics(args, profile, p, out, data_path, {"samples": grid_size, "recon": recon_size}, dict(
        tok=tok, pipe=pipe, clf_info=clf_info, timer=timer, gen_dir=gen_dir, codes_dir=codes_dir, names=names,
        num_train=int(len(y_train)), num_test=int(len(y_test)), tok_metrics=tok_metrics, generation=generation))
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    write_readme(out, metrics)
    pipe.save_pretrained(str(out / "pipeline"), metrics=card_metrics(metrics))  # the model card shows them
    _log(f"done in {metrics['timings_s']['total']:.0f} s: {out / 'metrics.json'}, {out / 'samples_grid.png'}, "
         f"{out / 'reconstructions.png'}, {out / 'loss_curves.png'}, pipeline in {out / 'pipeline'}")
    return 0


def card_metrics(metrics: dict) -> dict:
    """What the pipeline's model card shows: the demo's measured numbers (classifier-scored, not FID)."""
    tok, gen = metrics["tokenizer"], metrics["generation"]
    keys = ("cond_accuracy_cfg", "cond_accuracy_no_cfg", "classifier_fd_cfg", "classifier_fd_no_cfg",
            "classifier_fd_real_vs_real", "guidance_scale", "num_samples")
    return {"tokenizer_test_psnr": tok["psnr"], "tokenizer_test_ssim": tok["ssim"],
            **{k: gen[k] for k in keys if k in gen},
            "tokenizer_psnr_by_groups_to_use": tok.get("psnr_by_groups_to_use", {})}


def _num_codes(codes_dir: Path) -> int:
    with open(codes_dir / "meta.json") as f:
        return int(json.load(f)["counts"]["written"])


if __name__ == "__main__":
    sys.exit(main())
