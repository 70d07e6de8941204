"""Stage one: train the MGVQ tokenizer (accelerate: CPU, one GPU, DDP on many; same file everywhere).

    python -m tokenizer.train --config configs/tokenizer/tiny.yaml                       # CPU, Fashion-MNIST 32 px
    python -m tokenizer.train --config configs/tokenizer/tiny.yaml steps=200 loss.disc_start=100 out_dir=runs/t
    accelerate launch --num_processes 8 -m tokenizer.train --config configs/tokenizer/mgvq-f16c32-g8-imagenet-stage1.yaml \\
        data=/data/imagenet/train
    mgvq train-tokenizer --config ...                                                    # same thing

A YAML file overlays `TrainConfig`; trailing key=value pairs (YAML values, dotted keys into nested sections, e.g.
`model_overrides.vqgan.ch=16`, `loss.disc_weight=0`) overlay the YAML. Outputs under out_dir:
  train_config.yaml      the resolved config
  metrics.jsonl          one JSON line per logged step (loss terms, per-group usage / perplexity, PSNR, counters)
  tb/                    TensorBoard scalars + reconstruction images
  samples/step_*.png     top rows: inputs, bottom rows: reconstructions (every sample_every steps)
  checkpoints/step_*/    accelerate save_state (models, optimizers, EMA, RNG, data position); resume="auto" continues
                         from the newest one, giving the same losses as an uninterrupted run
  final/                 MGVQTokenizer.save_pretrained of the trained weights (final_ema/ too when ema=true)

Recipe (LlamaGen, reference B.8; MGVQ paper section 4): AdamW lr 1e-4 constant, betas (0.9, 0.95), grad clip 1.0 on
both the tokenizer and the PatchGAN, global batch 128, 40 epochs on ImageNet, disc_start 20000, disc_weight 0.5,
bf16 autocast where the device supports it, optional EMA. A non-finite loss or gradient skips the step (counted);
`max_nonfinite` of them in a row stop the run with an error.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from tokenizer.data import ResumableBatchSampler, build_dataset, collate
from tokenizer.losses import LossConfig, TokenizerLoss
from tokenizer.model import MGVQTokenizer, TokenizerConfig, apply_overrides
from tokenizer.outdir import check_output_dir


@dataclass
class TrainConfig:
    # model
    model: str = "mgvq-tiny"  # a preset of tokenizer.model (see PRESETS)
    model_overrides: dict = field(default_factory=dict)  # dotted keys allowed, e.g. {"vqgan.ch": 16}
    init_from: str | None = None  # a save_pretrained folder to start from (fine-tuning) instead of the preset
    # data
    data: str = "fashion-mnist"  # fashion-mnist[:split] | skimage | image folder | datasets folder / parquet | hf:name
    data_path: str | None = None  # Fashion-MNIST folder override
    data_split: str | None = None
    image_column: str | None = None
    label_column: str | None = "label"
    augmentation: str | None = None  # random_crop | center_crop | resize; None: the source's default
    num_crops: int = 4096  # data=skimage: number of random crops
    image_size: int | None = None  # None: the model config's image_size
    num_workers: int = 0
    # optimisation
    batch_size: int = 32  # per process
    steps: int | None = None  # total training steps (global)...
    epochs: float | None = None  # ...or epochs over the dataset (exactly one of steps / epochs)
    lr: float = 1e-4
    disc_lr: float | None = None  # None: lr
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss: dict = field(default_factory=dict)  # LossConfig fields
    ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: str = "auto"  # auto (bf16 where supported, else fp32) | bf16 | fp16 | no
    max_nonfinite: int = 10
    # bookkeeping
    out_dir: str = "runs/tokenizer"
    log_every: int = 10
    sample_every: int = 500
    num_samples: int = 8
    save_every: int = 1000  # accelerate checkpoint (resumable) every N steps, and always at the end
    keep_checkpoints: int = 2
    resume: str | None = "auto"  # auto: newest checkpoint in out_dir if any; a checkpoint path; null: start fresh
    lpips_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        def bad(name, valid):
            raise ValueError(f"train config: {name}={getattr(self, name)!r} is invalid; {valid}")

        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"train config: give exactly one of steps / epochs, got steps={self.steps!r}, "
                             f"epochs={self.epochs!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            bad("steps", "must be an integer >= 1")
        if self.epochs is not None and not self.epochs > 0:
            bad("epochs", "must be > 0")
        for name in ("batch_size", "log_every", "sample_every", "save_every", "max_nonfinite", "num_crops",
                     "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        if self.num_samples < 0:
            bad("num_samples", "must be >= 0")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if not self.lr > 0 or (self.disc_lr is not None and not self.disc_lr > 0):
            raise ValueError(f"train config: lr ({self.lr}) and disc_lr ({self.disc_lr}) must be > 0")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not self.grad_clip > 0:
            bad("grad_clip", "must be > 0")
        if not 0 < self.ema_decay < 1:
            bad("ema_decay", "must be in (0, 1)")
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            bad("mixed_precision", "valid: auto, bf16, fp16, no")
        if not isinstance(self.model_overrides, dict):
            bad("model_overrides", "must be a mapping")
        if isinstance(self.loss, LossConfig):
            self.loss = dataclasses.asdict(self.loss)
        self.loss_config()  # validate now

    def loss_config(self) -> LossConfig:
        valid = {f.name for f in dataclasses.fields(LossConfig)}
        unknown = sorted(set(self.loss) - valid)
        if unknown:
            raise ValueError(f"train config: unknown loss field(s) {unknown}; valid: {sorted(valid)}")
        return LossConfig(**self.loss)


# ---- config parsing --------------------------------------------------------------------------------------------------
def _parse_value(text: str):
    """YAML scalar, except that 1e-3 style numbers (strings in YAML 1.1) become floats."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    d: dict = {}
    if path:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a tokenizer training config must be a YAML mapping, got {type(d).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        d = apply_overrides(d, {key: _parse_value(value)})
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown tokenizer training field(s) {unknown}; valid: {sorted(valid)}")
    return TrainConfig(**d)


def build_model(cfg: TrainConfig) -> MGVQTokenizer:
    if cfg.init_from:
        return MGVQTokenizer.from_pretrained(cfg.init_from, **cfg.model_overrides).train()
    return MGVQTokenizer.from_preset(cfg.model, **cfg.model_overrides)


# ---- small helpers ---------------------------------------------------------------------------------------------------
class TrainState:
    """Counters saved with every checkpoint (data position = step)."""

    def __init__(self):
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.decode_failures = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, d):
        for k, v in d.items():
            setattr(self, k, v)


class UsageWindowPosition:
    """The quantizer's usage ring-buffer write position (a non-persistent buffer, so not in the model's state_dict)
    saved with the checkpoint, so that a resumed run reports exactly the usage of an uninterrupted one."""

    def __init__(self, quantizer):
        self.q = quantizer

    def state_dict(self):
        return {"pos": self.q._window_pos.tolist()}

    def load_state_dict(self, d):
        self.q._window_pos.copy_(torch.tensor(d["pos"], dtype=torch.long))


class EMA(torch.nn.Module):
    """fp32 exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR (dB) of the batch-mean MSE on images mapped to [0, 1] (MGVQ eval_recon convention)."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _checkpoints(out_dir: Path) -> list[Path]:
    ck = out_dir / "checkpoints"
    found = [p for p in ck.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@torch.no_grad()
def save_grid(x: torch.Tensor, recon: torch.Tensor, path: Path) -> torch.Tensor:
    from torchvision.utils import make_grid, save_image

    imgs = torch.cat([x, recon]).float().clamp(-1, 1).add(1).div(2).cpu()
    grid = make_grid(imgs, nrow=max(1, x.shape[0]), padding=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return grid


# ---- training --------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # CPU: cpu=True is what makes accelerate 1.15 pick MULTI_CPU (DDP) under torchrun / accelerate launch (without it
    # the processes train unsynchronised), with gloo. Single process: no kwargs (accelerate would create a group).
    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed and on_cpu else []
    check_output_dir(cfg.out_dir, what="out_dir")  # an unwritable out_dir or a full disk fails now, not at step 1000
    acc = Accelerator(cpu=on_cpu, mixed_precision=_mixed_precision(cfg.mixed_precision), kwargs_handlers=kwargs)
    if distributed and acc.num_processes > 1 and acc.distributed_type.name not in ("MULTI_CPU", "MULTI_GPU"):
        raise RuntimeError(f"launched with {acc.num_processes} processes but accelerate chose "
                           f"{acc.distributed_type}; gradients would not be synchronised")
    device, main = acc.device, acc.is_main_process
    out = Path(cfg.out_dir)
    set_seed(cfg.seed)

    model = build_model(cfg)
    tcfg: TokenizerConfig = model.config
    image_size = cfg.image_size or tcfg.image_size
    if image_size % tcfg.downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the model's downsample factor "
                         f"{tcfg.downsample}")
    loss_cfg = cfg.loss_config()
    with acc.main_process_first():  # one process fetches LPIPS weights / Fashion-MNIST if missing, the rest reuse
        loss_fn = TokenizerLoss(loss_cfg, cfg.lpips_dir).to(device)
        dataset = build_dataset(cfg.data, image_size, train=True, split=cfg.data_split,
                                augmentation=cfg.augmentation, path=cfg.data_path, image_column=cfg.image_column,
                                label_column=cfg.label_column, num_crops=cfg.num_crops, seed=cfg.seed)
    steps_per_epoch = len(dataset) // (cfg.batch_size * acc.num_processes)
    if steps_per_epoch < 1:
        raise ValueError(f"dataset {cfg.data!r} has {len(dataset)} images, fewer than one global batch "
                         f"({cfg.batch_size} x {acc.num_processes})")
    total_steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * steps_per_epoch)

    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    disc = loss_fn.discriminator
    if disc is not None:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)
        model, opt_g, disc, opt_d = acc.prepare(model, opt_g, disc, opt_d)
    else:
        model, opt_g = acc.prepare(model, opt_g)
        opt_d = None
    raw = acc.unwrap_model(model)
    ema = EMA(raw, cfg.ema_decay).to(device) if cfg.ema else None
    state = TrainState()
    acc.register_for_checkpointing(state)
    if ema is not None:
        acc.register_for_checkpointing(ema)
    acc.register_for_checkpointing(UsageWindowPosition(raw.quantize))

    # resume
    ckpts = _checkpoints(out)
    resume_from = None
    if cfg.resume == "auto":
        resume_from = ckpts[-1] if ckpts else None
    elif cfg.resume:
        resume_from = Path(cfg.resume)
        if not resume_from.is_dir():
            raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint folder")
    if resume_from is not None:
        acc.load_state(str(resume_from))
        acc.print(f"resumed from {resume_from} at step {state.step}")
        if main and (out / "metrics.jsonl").exists():  # drop lines logged after the checkpoint (a crashed run)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= state.step]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))

    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                                    start_step=state.step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG
    sample_x = None
    if main and cfg.num_samples:
        sample_x = collate([dataset[(i, i)] for i in range(min(cfg.num_samples, len(dataset)))])["image"].to(device)

    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train_config.yaml", "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg) | {"betas": list(cfg.betas)}, f, sort_keys=False)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        acc.print(f"tokenizer {cfg.init_from or cfg.model}: {raw.num_parameters() / 1e6:.2f}M params, "
                  f"G={tcfg.groups} K={tcfg.codebook_size} C={tcfg.latent_dim} f={tcfg.downsample}; "
                  f"{len(dataset)} images at {image_size}px, {steps_per_epoch} steps/epoch, {total_steps} steps, "
                  f"{acc.num_processes} process(es) on {device}, precision {acc.mixed_precision}")

    def log_samples(step: int):
        if sample_x is None:
            return
        net = ema.model if ema is not None else raw
        was = net.training
        net.eval()
        with torch.no_grad(), acc.autocast():
            rec = net(sample_x).recon
        net.train(was)
        grid = save_grid(sample_x, rec, out / "samples" / f"step_{step:07d}.png")
        writer.add_image("reconstructions", grid, step)

    def save_checkpoint():  # atomic: written to .tmp_step_N, renamed to step_N only when complete
        import shutil

        final = out / "checkpoints" / f"step_{state.step:07d}"
        tmp = final.with_name(f".tmp_{final.name}")
        if main and tmp.exists():  # a partial save of a killed run
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    metrics_f = open(out / "metrics.jsonl", "a") if main else None
    pbar = tqdm(total=total_steps, initial=state.step, disable=not main, desc="tokenizer", dynamic_ncols=True)
    last: dict = {}
    t0 = time.time()
    data_iter = iter(loader)
    model.train()
    while state.step < total_steps:
        batch = next(data_iter)
        x = batch["image"].to(device, non_blocking=True)
        state.decode_failures += int(batch["failed"])
        step = state.step  # the step being computed (0-based); adopt_weight compares against it
        with acc.autocast():
            out_t = model(x)
            loss_g, terms = loss_fn.generator_loss(x, out_t, step, disc=disc)
        finite = torch.tensor(float(torch.isfinite(loss_g).item()), device=device)
        if acc.num_processes > 1:
            finite = acc.reduce(finite, reduction="sum") / acc.num_processes
        ok = finite.item() == 1.0
        gnorm = dnorm = float("nan")
        if ok:
            opt_g.zero_grad(set_to_none=True)
            acc.backward(loss_g)
            gnorm = float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            ok = math.isfinite(gnorm)  # grads are all-reduced, so every rank agrees
            if ok:
                opt_g.step()
        if ok and disc is not None and loss_fn.disc_factor(step) > 0:
            opt_d.zero_grad(set_to_none=True)  # drop the G step's gradients in D
            with acc.autocast():
                loss_d, dterms = loss_fn.discriminator_loss(x, out_t.recon, step, disc=disc)
            terms.update(dterms)
            acc.backward(loss_d)
            dnorm = float(acc.clip_grad_norm_(disc.parameters(), cfg.grad_clip))
            if math.isfinite(dnorm):
                opt_d.step()
            else:
                opt_d.zero_grad(set_to_none=True)
        if not ok:
            opt_g.zero_grad(set_to_none=True)
            state.nonfinite_total += 1
            state.nonfinite_in_row += 1
            acc.print(f"step {step}: non-finite loss/grad (loss {terms.get('total')}, grad norm {gnorm}); skipped "
                      f"({state.nonfinite_in_row} in a row)")
            if state.nonfinite_in_row >= cfg.max_nonfinite:
                raise RuntimeError(f"{state.nonfinite_in_row} non-finite steps in a row (max_nonfinite="
                                   f"{cfg.max_nonfinite}) at step {step}; last terms {terms}. Lower lr, check the "
                                   f"data, or use mixed_precision=no.")
        else:
            state.nonfinite_in_row = 0
            if ema is not None:
                ema.update(raw)
        state.step += 1

        if state.step % cfg.log_every == 0 or state.step == total_steps:
            keep = int(out_t.keep_groups)
            rec = {"step": state.step, "epoch": state.step / steps_per_epoch, **terms,
                   "psnr": psnr(out_t.recon.detach(), x), "keep_groups": keep,
                   "usage": [round(float(u), 4) for u in out_t.usage],
                   "perplexity": [round(float(p), 2) for p in out_t.perplexity],
                   "grad_norm": gnorm, "disc_grad_norm": dnorm, "disc_factor": loss_fn.disc_factor(step),
                   "nonfinite_skipped": state.nonfinite_total, "decode_failures": state.decode_failures,
                   "sec_per_step": (time.time() - t0) / cfg.log_every}
            t0 = time.time()
            last = rec
            if main:
                metrics_f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                            for k, v in rec.items()}) + "\n")
                metrics_f.flush()
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                        writer.add_scalar(f"train/{k}", v, state.step)
                for g, (u, p) in enumerate(zip(rec["usage"], rec["perplexity"])):
                    writer.add_scalar(f"usage/group{g}", u, state.step)
                    writer.add_scalar(f"perplexity/group{g}", p, state.step)
                pbar.set_postfix(loss=f"{terms['total']:.4f}", psnr=f"{rec['psnr']:.2f}",
                                 usage=f"{min(rec['usage']):.2f}", refresh=False)
        if main and (state.step % cfg.sample_every == 0 or state.step == total_steps):
            log_samples(state.step)
        if state.step % cfg.save_every == 0 or state.step == total_steps:
            save_checkpoint()
        pbar.update(1)
    pbar.close()

    acc.wait_for_everyone()
    summary = dict(last)
    if main:
        raw.save_pretrained(str(out / "final"))
        if ema is not None:
            ema.model.save_pretrained(str(out / "final_ema"))
        summary |= {"final": str(out / "final"), "steps": state.step}
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        metrics_f.close()
        writer.close()
        acc.print(f"done: {out / 'final'} (step {state.step}, psnr {last.get('psnr', float('nan')):.2f} dB, "
                  f"usage {last.get('usage')}, non-finite skipped {state.nonfinite_total}, "
                  f"unreadable images {state.decode_failures})")
    acc.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenizer.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file overlaying TrainConfig (configs/tokenizer/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value (YAML value; dotted keys for nested sections)")
    args = ap.parse_args(argv)
    train(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
