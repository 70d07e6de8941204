"""Stage one: train the MGVQ tokenizer (accelerate: CPU, one GPU, DDP on many; same file everywhere).

    python -m tokenizer.train --config configs/tokenizer/tiny.yaml                       # CPU, Fashion-MNIST 32 px
    python -m tokenizer.train --config configs/tokenizer/tiny.yaml steps=200 loss.disc_start=100 out_dir=runs/t
    accelerate launch --num_processes 8 -m tokenizer.train --config configs/tokenizer/mgvq-f16c32-g8-imagenet-stage1.yaml \\
        data=/data/imagenet/train
    mgvq train-tokenizer --config ...                                                    # same thing

A YAML file overlays `TrainConfig`; trailing key=value pairs (YAML values, dotted keys into nested sections, e.g.
`model_overrides.vqgan.ch=16`, `loss.disc_weight=0`) overlay the YAML. Outputs under out_dir:
  config.json            the resolved config
  metrics.jsonl          one JSON line per logged step (loss terms, per-group usage / perplexity, PSNR, counters)
  tb/                    TensorBoard scalars + reconstruction grids (log_with=tensorboard, the default)
  samples/step_*.png     labelled rows: originals, then decodes from the first 1, 2, ..., G groups
  checkpoints/step_*/    model, discriminator, optimizers, EMA, RNG, counters as safetensors + JSON; resume=auto
                         continues from the newest one, giving the same losses as an uninterrupted run
  final/                 MGVQTokenizer.save_pretrained of the trained weights (final_ema/ too when ema=true)

Recipe (LlamaGen, reference B.8; MGVQ paper section 4): AdamW lr 1e-4 constant, betas (0.9, 0.95), grad clip 1.0 on
both the tokenizer and the PatchGAN, global batch 128, 40 epochs on ImageNet, disc_start 20000, disc_weight 0.5,
bf16 autocast where the device supports it, optional EMA. A non-finite loss or gradient skips the step (counted);
`max_nonfinite` of them in a row stop the run with an error. Run infrastructure (checkpoints, config, accelerator,
logging, EMA, the non-finite guard) lives in `runtime/`, shared with generator.train.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime import checkpoint as ckpt
from runtime.accel import build_accelerator, launched_rank
from runtime.config import load_config as _load_config
from runtime.config import RunConfig, to_dict
from runtime.ema import EMA
from runtime.grid import reconstruction_labels, save_grid, to_uint8
from runtime.guard import NonFiniteGuard
from runtime.io import write_json
from runtime.metrics import MetricLogger, select_trackers
from runtime.optim import build_adamw, lr_at, set_lr
from runtime.outdir import RunLock, check_output_dir
from tokenizer.data import ResumableBatchSampler, build_dataset, collate, legacy_source
from tokenizer.losses import LossConfig, TokenizerLoss
from tokenizer.model import MGVQTokenizer, TokenizerConfig


@dataclass
class TrainConfig(RunConfig):
    """runtime.config.RunConfig (the fields both stages share) + the tokenizer's own; new defaults below."""

    model: str = "mgvq-tiny"  # a preset of tokenizer.model (see PRESETS); model_overrides e.g. {"vqgan.ch": 16}
    data: str = "skimage"  # skimage | image folder | IDX folder | datasets folder / parquet | hf:name
    data_split: str | None = None
    image_column: str | None = None
    label_column: str | None = "label"
    augmentation: str | None = None  # random_crop | center_crop | resize; None: the source's default
    num_crops: int = 4096  # data=skimage: number of random crops
    image_size: int | None = None  # None: the model config's image_size
    epochs: float | None = None  # epochs over the dataset (exactly one of steps / epochs)
    disc_lr: float | None = None  # PatchGAN lr; None: lr
    loss: dict = field(default_factory=dict)  # LossConfig fields
    out_dir: str = "runs/tokenizer"
    num_samples: int = 8  # images in the reconstruction grids
    lpips_dir: str | None = None

    RENAMED = {"mixed_precision": "precision"}  # old name -> new name (still accepted, with a deprecation message)

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"training config: give exactly one of steps / epochs, got steps={self.steps!r}, "
                             f"epochs={self.epochs!r}")
        self.check()
        if self.epochs is not None and not self.epochs > 0:
            self.bad("epochs", "must be > 0")
        if self.sample_every < 1:
            self.bad("sample_every", "must be an integer >= 1")
        for name, low in (("num_crops", 1), ("num_samples", 0)):
            if getattr(self, name) < low:
                self.bad(name, f"must be an integer >= {low}")
        if self.disc_lr is not None and not self.disc_lr > 0:
            self.bad("disc_lr", "must be > 0 (or null: lr)")
        if not self.grad_clip > 0:
            self.bad("grad_clip", "must be > 0")
        if isinstance(self.loss, LossConfig):
            self.loss = dataclasses.asdict(self.loss)
        self.loss_config()  # validate now

    def loss_config(self) -> LossConfig:
        valid = {f.name for f in dataclasses.fields(LossConfig)}
        unknown = sorted(set(self.loss) - valid)
        if unknown:
            raise ValueError(f"training config: unknown loss field(s) {unknown}; valid: {sorted(valid)}")
        return LossConfig(**self.loss)

    @classmethod
    def migrate(cls, d: dict) -> dict:
        """Old spellings that are not a plain rename."""
        if "resume" in d and d["resume"] is None:
            d["resume"] = "none"
        if "data_path" in d or str(d.get("data", "")).startswith("fashion-mnist"):
            data, split = legacy_source(str(d.get("data", "fashion-mnist")), d.pop("data_path", None))
            d["data"] = data
            if split:
                d["data_split"] = split
        if d.get("mixed_precision") == "no" or d.get("mixed_precision") is False:
            d["mixed_precision"] = "fp32"
        return d


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """TrainConfig defaults <- YAML `path` <- key=value `overrides` (runtime.config: one parser for every stage)."""
    return _load_config(TrainConfig, path, overrides, what="training config")


def build_model(cfg: TrainConfig) -> MGVQTokenizer:
    if cfg.init_from:
        return MGVQTokenizer.from_pretrained(cfg.init_from, **cfg.model_overrides).train()
    return MGVQTokenizer.from_preset(cfg.model, **cfg.model_overrides)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR (dB) of the batch-mean MSE on images mapped to [0, 1] (MGVQ eval_recon convention)."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ---- the run: set-up, one step, checkpoints, samples, export ---------------------------------------------------------
@dataclass
class Run:
    cfg: TrainConfig
    acc: object
    model: torch.nn.Module  # as prepared (DDP-wrapped when distributed)
    raw: MGVQTokenizer
    loss_fn: TokenizerLoss
    disc: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    ema: EMA | None
    guard: NonFiniteGuard
    folder: ckpt.CheckpointFolder
    logger: MetricLogger
    identity: dict
    total_steps: int
    steps_per_epoch: int
    sample_x: torch.Tensor | None
    step: int = 0
    decode_failures: int = 0
    last: dict = field(default_factory=dict)


def setup(cfg: TrainConfig) -> tuple[Run, object]:
    """Accelerator, model, losses, data, optimizers, EMA, resume; returns the run and its batch iterator."""
    acc = build_accelerator(cfg.precision, trackers=select_trackers(cfg.log_with), project_dir=cfg.out_dir)
    from accelerate.utils import set_seed

    device, main = acc.device, acc.is_main_process
    set_seed(cfg.seed)
    model = build_model(cfg)
    tcfg: TokenizerConfig = model.config
    image_size = cfg.image_size or tcfg.image_size
    if image_size % tcfg.downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the model's downsample factor "
                         f"{tcfg.downsample}")
    with acc.main_process_first():  # one process fetches LPIPS weights / Fashion-MNIST if missing, the rest reuse
        loss_fn = TokenizerLoss(cfg.loss_config(), cfg.lpips_dir).to(device)
        dataset = build_dataset(cfg.data, image_size, train=True, split=cfg.data_split,
                                augmentation=cfg.augmentation, image_column=cfg.image_column,
                                label_column=cfg.label_column, num_crops=cfg.num_crops, seed=cfg.seed)
    steps_per_epoch = len(dataset) // (cfg.batch_size * acc.num_processes)
    if steps_per_epoch < 1:
        raise ValueError(f"dataset {cfg.data!r} has {len(dataset)} images, fewer than one global batch "
                         f"({cfg.batch_size} x {acc.num_processes})")
    total_steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * steps_per_epoch)
    opt_g = build_adamw(model.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, cfg.eps)
    disc, opt_d = loss_fn.discriminator, None
    if disc is not None:
        opt_d = build_adamw(disc.parameters(), cfg.disc_lr or cfg.lr, cfg.betas, cfg.weight_decay, cfg.eps)
        model, opt_g, disc, opt_d = acc.prepare(model, opt_g, disc, opt_d)
    else:
        model, opt_g = acc.prepare(model, opt_g)
    raw = acc.unwrap_model(model)
    identity = {"model_config": raw.config.to_dict(), "batch_size": cfg.batch_size, "seed": cfg.seed,
                "data": cfg.data, "world_size": acc.num_processes}
    run = Run(cfg, acc, model, raw, loss_fn, disc, opt_g, opt_d, EMA(raw, cfg.ema_decay) if cfg.ema else None,
              NonFiniteGuard(cfg.max_nonfinite, log=acc.print),
              ckpt.CheckpointFolder(cfg.out_dir, cfg.keep_checkpoints, main, acc.wait_for_everyone),
              None, identity, total_steps, steps_per_epoch, None)
    run.folder.clean_partial()
    resume(run, run.folder.resolve(cfg.resume))
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                                    start_step=run.step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG
    if main and cfg.num_samples:
        n = min(cfg.num_samples, len(dataset))
        run.sample_x = collate([dataset[(i, i)] for i in range(n)])["image"].to(device)
    if main:
        write_json(Path(cfg.out_dir) / "config.json", {"train": to_dict(cfg), "model": raw.config.to_dict(),
                                                       "world_size": acc.num_processes})
    run.logger = MetricLogger(acc, cfg.out_dir, select_trackers(cfg.log_with), to_dict(cfg))
    acc.print(f"tokenizer {cfg.init_from or cfg.model}: {raw.num_parameters() / 1e6:.2f}M params, "
              f"G={tcfg.groups} K={tcfg.codebook_size} C={tcfg.latent_dim} f={tcfg.downsample}; "
              f"{len(dataset)} images at {image_size}px, {steps_per_epoch} steps/epoch, {total_steps} steps, "
              f"{acc.num_processes} process(es) on {device}, precision {acc.mixed_precision}")
    return run, iter(loader)


def _parts(run: Run):
    """(name, module, optimizer) of everything a checkpoint holds besides RNG and counters."""
    parts = [("model", run.raw, run.opt_g)]
    if run.disc is not None:
        parts.append(("discriminator", run.acc.unwrap_model(run.disc), run.opt_d))
    return parts


def save_checkpoint(run: Run) -> Path:
    rank = run.acc.process_index

    def write(d: Path):
        if run.acc.is_main_process:
            for name, module, opt in _parts(run):
                ckpt.save_module(d / name, module)
                ckpt.save_optimizer(d / name, opt)
            if run.ema is not None:
                ckpt.save_module(d / "ema", run.ema.state_dict())
        ckpt.save_rng(d / f"rng_rank{rank}")

    state = {"identity": run.identity, "config": to_dict(run.cfg), "guard": run.guard.state_dict(),
             "decode_failures": run.decode_failures, "usage_window_pos":
                 run.raw.quantize._window_pos.tolist() if run.raw.is_quantized else None}
    return run.folder.save(run.step, write, state)


def resume(run: Run, path: Path | None) -> None:
    if path is None:
        return
    state = run.folder.read_state(path)
    ckpt.check_identity(state["identity"], run.identity, str(path))
    for name, module, opt in _parts(run):
        ckpt.load_module(path / name, module)
        ckpt.load_optimizer(path / name, opt)
    if run.ema is not None:
        run.ema.load_state_dict(ckpt.load_tensors(path / "ema.safetensors"))
    ckpt.load_rng(path / f"rng_rank{run.acc.process_index}")
    run.guard.load_state_dict(state["guard"])
    run.step, run.decode_failures = state["step"], state["decode_failures"]
    if run.raw.is_quantized:  # continuous baselines (quantizer none / kl) have no usage window
        run.raw.quantize._window_pos.copy_(torch.tensor(state["usage_window_pos"], dtype=torch.long))
    if run.acc.is_main_process:  # drop lines logged after the checkpoint (a crashed run)
        ckpt.truncate_metrics(Path(run.cfg.out_dir) / "metrics.jsonl", run.step)
    run.acc.print(f"resumed from {path} at step {run.step}")


def train_step(run: Run, x: torch.Tensor) -> tuple[dict, object, float, float]:
    """One generator (tokenizer) update and, once the PatchGAN is on, one discriminator update; a non-finite loss or
    gradient skips the update (every rank agrees). Returns (loss terms, model output, grad norm, disc grad norm)."""
    acc, cfg, step = run.acc, run.cfg, run.step  # the step being computed (0-based); adopt_weight compares to it
    for opt, base in ((run.opt_g, cfg.lr), (run.opt_d, cfg.disc_lr or cfg.lr)):
        if opt is not None and (cfg.lr_schedule != "constant" or cfg.warmup_steps):
            set_lr(opt, lr_at(step, run.total_steps, base, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr))
    with acc.autocast():
        out = run.model(x)
        loss_g, terms = run.loss_fn.generator_loss(x, out, step, disc=run.disc)
    finite = torch.tensor(float(torch.isfinite(loss_g).item()), device=acc.device)
    if acc.num_processes > 1:
        finite = acc.reduce(finite, reduction="sum") / acc.num_processes
    ok = finite.item() == 1.0
    gnorm = dnorm = float("nan")
    if ok:
        run.opt_g.zero_grad(set_to_none=True)
        acc.backward(loss_g)
        gnorm = float(acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip))
        ok = math.isfinite(gnorm)  # grads are all-reduced, so every rank agrees
        if ok:
            run.opt_g.step()
    if ok and run.disc is not None and run.loss_fn.disc_factor(step) > 0:
        run.opt_d.zero_grad(set_to_none=True)  # drop the G step's gradients in D
        with acc.autocast():
            loss_d, dterms = run.loss_fn.discriminator_loss(x, out.recon, step, disc=run.disc)
        terms.update(dterms)
        acc.backward(loss_d)
        dnorm = float(acc.clip_grad_norm_(run.disc.parameters(), cfg.grad_clip))
        if math.isfinite(dnorm):
            run.opt_d.step()
        else:
            run.opt_d.zero_grad(set_to_none=True)
    if not ok:
        run.opt_g.zero_grad(set_to_none=True)
    run.step += 1
    last = run.folder.latest() if not ok else None
    run.guard.record(ok, run.step, "" if ok else f"loss {terms.get('total')}, grad norm {gnorm}", last)
    if ok and run.ema is not None:
        run.ema.update(run.raw)
    return terms, out, gnorm, dnorm


def log_step(run: Run, x, terms: dict, out, gnorm: float, dnorm: float, seconds: float) -> dict:
    rec = {"step": run.step, "epoch": run.step / run.steps_per_epoch, **terms, "psnr": psnr(out.recon.detach(), x),
           "keep_groups": int(out.keep_groups), "usage": [round(float(u), 4) for u in out.usage],
           "perplexity": [round(float(p), 2) for p in out.perplexity], "grad_norm": gnorm, "disc_grad_norm": dnorm,
           "disc_factor": run.loss_fn.disc_factor(run.step - 1), "skipped_steps": run.guard.skipped_steps,
           "decode_failures": run.decode_failures, "sec_per_step": seconds}
    run.logger.log(rec, run.step)
    return rec


@torch.no_grad()
def sample_grid(run: Run) -> None:
    """Originals, then decodes from the first 1..G groups (EMA weights when ema=true), one labelled row each."""
    if run.sample_x is None:
        return
    net = run.raw
    if run.ema is not None:
        net = copy.deepcopy(run.raw)  # not a fresh init: that would draw from the global RNG
        net.load_state_dict(run.ema.model_state(run.raw))
    was = net.training
    net.eval()
    x = run.sample_x
    with run.acc.autocast():
        if net.is_quantized:
            idx = net.encode(x)
            G = net.config.groups
            rows, labels = [net.decode(idx, groups_to_use=g) for g in range(1, G + 1)], reconstruction_labels(G)
        else:
            rows, labels = [net(x).recon], ["original", "reconstruction"]
    net.train(was)
    images = to_uint8(torch.cat([x, *rows]), (-1.0, 1.0))
    path = Path(run.cfg.out_dir) / "samples" / f"{ckpt.step_dir_name(run.step)}.png"
    save_grid(images, path, ncol=x.shape[0], row_labels=labels)
    run.logger.log_images("reconstructions", images, run.step, str(path))


def export(run: Run) -> dict:
    run.acc.wait_for_everyone()
    out, summary = Path(run.cfg.out_dir), dict(run.last)
    if run.acc.is_main_process:
        run.raw.save_pretrained(str(out / "final"))
        if run.ema is not None:
            ema_model = copy.deepcopy(run.raw).cpu()
            ema_model.load_state_dict(run.ema.model_state(run.raw))
            ema_model.save_pretrained(str(out / "final_ema"))
        summary |= {"final": str(out / "final"), "steps": run.step, "skipped_steps": run.guard.skipped_steps,
                    "decode_failures": run.decode_failures}
        write_json(out / "summary.json", summary)
        run.acc.print(f"done: {out / 'final'} (step {run.step}, psnr {summary.get('psnr', float('nan')):.2f} dB, "
                      f"usage {summary.get('usage')}, non-finite skipped {run.guard.skipped_steps}, "
                      f"unreadable images {run.decode_failures})")
    return summary


def train(cfg: TrainConfig) -> dict:
    """Train; returns the last logged metrics + where the weights went (also written to <out_dir>/summary.json)."""
    check_output_dir(cfg.out_dir, what="out_dir")  # an unwritable out_dir or a full disk fails now, not at step 1000
    with RunLock(cfg.out_dir, "out_dir", enabled=launched_rank() == 0):
        run, batches = setup(cfg)
        from tqdm.auto import tqdm

        pbar = tqdm(total=run.total_steps, initial=run.step, disable=not run.acc.is_main_process, desc="tokenizer",
                    dynamic_ncols=True)
        t0 = time.time()
        run.model.train()
        try:
            while run.step < run.total_steps:
                batch = next(batches)
                x = batch["image"].to(run.acc.device, non_blocking=True)
                run.decode_failures += int(batch["failed"])
                terms, out, gnorm, dnorm = train_step(run, x)
                if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                    run.last = log_step(run, x, terms, out, gnorm, dnorm, (time.time() - t0) / cfg.log_every)
                    t0 = time.time()
                    pbar.set_postfix(loss=f"{terms['total']:.4f}", psnr=f"{run.last['psnr']:.2f}", refresh=False)
                if run.acc.is_main_process and (run.step % cfg.sample_every == 0 or run.step == run.total_steps):
                    sample_grid(run)
                if run.step % cfg.save_every == 0 or run.step == run.total_steps:
                    save_checkpoint(run)
                pbar.update(1)
            return export(run)
        finally:
            pbar.close()
            run.logger.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenizer.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file overlaying TrainConfig (configs/tokenizer/*.yaml)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="key=value (YAML value; dotted keys for nested sections)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import json

        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
