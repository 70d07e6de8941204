"""Stage two: train the class-conditional GPT on cached MGVQ codes (accelerate; DDP or DeepSpeed ZeRO-1/2/3).

One linear, launcher-agnostic script. The same file runs on a laptop CPU and on many GPU nodes:

    python -m generator.train --config configs/generator/tiny.yaml data=shards/fmnist out_dir=runs/gen-tiny
    accelerate launch --config_file configs/accelerate/zero2.yaml -m generator.train --config configs/generator/gpt-b.yaml
    torchrun --nproc_per_node 8 -m generator.train --config configs/generator/gpt-xxl.yaml deepspeed=configs/deepspeed/zero3.json
    mgvq train-generator tokenizer=runs/tok/final --config ...   # + decoded sample grids and a ready pipeline folder

Recipe (LlamaGen `train_c2i.py`): AdamW betas (0.9, 0.95), weight decay 0.05 on >=2-D params only, lr 1e-4 constant,
grad clip 1.0, bf16 autocast, global batch 256 (gradient accumulation fills it from batch_size x world size), 300 epochs.

Determinism and resumption: the data order is a pure function of (seed, step) (one permutation per epoch, one global
batch per step, split into micro-batches per rank), the augmented view of an item a pure function of
(seed, epoch, index), and every rank's RNG state is part of the checkpoint. So a run killed at any point and started
again with the same command continues from its last checkpoint and reaches the same weights as an uninterrupted run
(bit-exact on the CPU). Checkpoints are safetensors + JSON written to a temp dir and renamed (atomic; DeepSpeed's
sharded state stays in its own format); SIGTERM saves one and exits. A non-finite loss never reaches the weights: the
step is skipped and counted; `max_nonfinite` in a row stop the run. Run infrastructure lives in `runtime/` (shared
with tokenizer.train). This module never imports `tokenizer/`: decoded sample images come from a `decode_fn` given to
`train()` (pipelines/train_generator.py wires the tokenizer in).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn

from runtime import checkpoint as ckpt
from runtime.accel import build_accelerator, configure_deepspeed, is_deepspeed, launched_rank, zero_stage
from runtime.config import load_config as _load_config
from runtime.config import RunConfig, to_dict
from runtime.ema import EMA
from runtime.fingerprint import check_same_tokenizer
from runtime.grid import save_grid, to_uint8
from runtime.guard import NonFiniteGuard
from runtime.io import save_tensors, write_json
from runtime.metrics import MetricLogger, select_trackers
from runtime.optim import build_adamw, lr_at, set_lr
from runtime.outdir import RunLock, check_output_dir

from .model import GPT, PRESETS, GPTConfig

EXAMPLE = """examples:
  # CPU, tiny model on code shards written by `mgvq cache-codes`:
  python -m generator.train --config configs/generator/tiny.yaml data=shards/fmnist-train out_dir=runs/gen-tiny
  # 8 GPUs, ZeRO-2 (any YAML key can be overridden with key=value; model fields with model_overrides.<field>=...):
  accelerate launch --config_file configs/accelerate/zero2.yaml -m generator.train \\
      --config configs/generator/gpt-b.yaml data=shards/imagenet-train out_dir=runs/gpt-b --peak-tflops 989
  # synthetic data (benchmarking), 20 steps:
  python -m generator.train --config configs/generator/tiny.yaml data=synthetic steps=20 out_dir=/tmp/gen
"""


# ---------------------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig(RunConfig):
    """runtime.config.RunConfig (the fields both stages share) + the generator's own; new defaults below."""

    model: str = "GPT-B"  # preset name (generator.model.PRESETS); model_overrides: GPTConfig fields
    codebook: str | None = None  # input_mode=projector: a tokenizer folder, or a safetensors file (G, K, C/G)
    compile: bool = False  # regional torch.compile of the blocks (generator.perf)
    activation_checkpointing: str = "none"  # none | full | selective | alternate (generator.perf)
    data: str = "synthetic"  # code-shard dir (meta.json + Parquet) or "synthetic"
    view: str = "random"  # "random" or an int view index (0 = centre crop)
    synthetic_size: int = 4096  # items in the synthetic dataset (codes drawn around one template per class)
    synthetic_meta: dict = field(default_factory=dict)  # data=synthetic only: groups/codebook_size/grid/num_classes
    num_workers: int = 2
    global_batch_size: int = 256  # accumulation = global / (batch_size * world)
    epochs: int = 300  # used when steps is null
    weight_decay: float = 0.05  # on >= 2-D parameters only (GPT.param_groups)
    deepspeed: str | None = None  # DeepSpeed JSON when not launched with an accelerate DeepSpeed config
    out_dir: str = "runs/generator"
    keep_checkpoints: int = 3
    sample_every: int = 5000  # 0 = only at the end
    sample_classes: list | None = None  # default: the first 8 classes (text models: item indices, their captions)
    sample_cfg_scale: float = 4.0
    sample_temperature: float = 1.0
    sample_top_k: int | None = None
    peak_tflops: float | None = None  # device peak for MFU (H100/H200 bf16 dense: 989)

    # old name -> new name (still accepted, with a deprecation message; see `migrate` for the others)
    RENAMED = {"model_args": "model_overrides", "out": "out_dir", "ckpt_every": "save_every",
               "keep_last": "keep_checkpoints", "max_steps": "steps", "max_nonfinite_in_row": "max_nonfinite"}

    @classmethod
    def migrate(cls, d: dict) -> dict:
        from runtime.config import deprecated

        if "beta1" in d or "beta2" in d:
            deprecated("beta1/beta2", "betas: [b1, b2]", "training config")
            d["betas"] = [d.pop("beta1", 0.9), d.pop("beta2", 0.95)]
        if "tensorboard" in d:
            deprecated("tensorboard", "log_with", "training config")
            d["log_with"] = "tensorboard" if d.pop("tensorboard") else "none"
        if "inject_nan_at" in d:
            raise ValueError("training config: inject_nan_at was removed (fault injection lives in the tests: they "
                             "monkeypatch the loss); delete the key")
        if d.get("precision") in (False, "no"):
            d["precision"] = "fp32"
        if "resume" in d and d["resume"] is None:
            d["resume"] = "none"
        return d

    def __post_init__(self):
        self.check()
        bad = self.bad
        if self.model not in PRESETS:
            bad("model", f"unknown preset; valid: {', '.join(PRESETS)}")
        types = {f.name: str(f.type) for f in fields(GPTConfig)}
        unknown = sorted(set(self.model_overrides) - set(types))
        if unknown:
            bad("model_overrides", f"unknown GPTConfig field(s) {unknown}; valid: {sorted(types)}")
        self.model_overrides = {k: float(v) if types[k].startswith("float") and isinstance(v, int)
                                and not isinstance(v, bool) else v for k, v in self.model_overrides.items()}
        for name in ("global_batch_size", "epochs", "synthetic_size"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        if self.global_batch_size % self.batch_size:
            bad("global_batch_size", f"must be a multiple of batch_size={self.batch_size}")
        if not self.sample_cfg_scale >= 0:
            bad("sample_cfg_scale", "must be >= 0 (1.0 = no guidance)")
        if not self.sample_temperature >= 0:
            bad("sample_temperature", "must be >= 0 (0 = greedy)")
        if self.sample_top_k is not None and (not isinstance(self.sample_top_k, int) or self.sample_top_k < 0):
            bad("sample_top_k", "must be null or an integer >= 0 (0 = off, 1 = greedy)")
        if self.sample_classes is not None and (
                not isinstance(self.sample_classes, list)
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.sample_classes)):
            bad("sample_classes", "must be null or a list of class indices >= 0")
        if self.view != "random":
            try:
                self.view = int(self.view)
            except (TypeError, ValueError):
                bad("view", "expected 'random' or an int view index")
        from .perf import CHECKPOINTING

        if self.activation_checkpointing not in CHECKPOINTING:
            bad("activation_checkpointing", f"valid: {', '.join(map(repr, CHECKPOINTING))}")


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """TrainConfig defaults <- YAML `path` <- key=value `overrides` (runtime.config: one parser for every stage;
    dotted `model_overrides.<field>=...` allowed)."""
    return _load_config(TrainConfig, path, overrides, what="training config")


# ------------------------------------------------------------------------------------------------------------ data


class SyntheticCodes(torch.utils.data.Dataset):
    """Learnable random codes: each class has a template code map; an item is its class template with 25% of the
    sub-tokens replaced by uniform random codes. Deterministic in (seed, index); for CPU tests and GPU benchmarks."""

    def __init__(self, size: int, grid: int, groups: int, codebook_size: int, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (size,), generator=g)
        templates = torch.randint(codebook_size, (num_classes, grid, grid, groups), generator=g)
        noise = torch.randint(codebook_size, (size, grid, grid, groups), generator=g)
        keep = torch.rand(size, grid, grid, groups, generator=g) >= 0.25
        dtype = torch.int16 if codebook_size <= 32767 else torch.int32
        self.codes = torch.where(keep, templates[self.labels], noise).to(dtype)
        self.meta = {"groups": groups, "codebook_size": codebook_size, "grid": [grid, grid],
                     "num_classes": num_classes, "class_names": [f"class_{i}" for i in range(num_classes)]}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.codes[i].long(), self.labels[i]


class EpochIndexed(torch.utils.data.Dataset):
    """Items are (epoch, index): sets the wrapped dataset's epoch (seeded views) before a batched fetch."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitems__(self, pairs):
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(pairs[0][0])
        idx = [i for _, i in pairs]
        if hasattr(self.ds, "__getitems__"):
            return self.ds.__getitems__(idx)
        return [self.ds[i] for i in idx]

    def __getitem__(self, pair):
        return self.__getitems__([pair])[0]


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches from `start_step`: global step s takes the s-th block of global_batch items of
    its epoch's permutation (seeded by (seed, epoch)); micro-step m of rank r takes slot (m * world + r)."""

    def __init__(self, n, global_batch, micro_batch, world, rank, seed, start_step, total_steps):
        self.n, self.gb, self.b, self.world, self.rank = n, global_batch, micro_batch, world, rank
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.accum = global_batch // (micro_batch * world)
        self.steps_per_epoch = n // global_batch

    def __len__(self):
        return (self.total - self.start) * self.accum

    def __iter__(self):
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, j = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=gen).tolist(), epoch
            chunk = perm[j * self.gb:(j + 1) * self.gb]
            for m in range(self.accum):
                off = (m * self.world + self.rank) * self.b
                yield [(epoch, i) for i in chunk[off:off + self.b]]


def build_dataset(cfg: TrainConfig, model_args: dict):
    """(dataset, meta): the code shards (G/K/grid/classes checked against model_args) or synthetic codes."""
    if cfg.data == "synthetic":
        c = GPTConfig.from_dict({**PRESETS[cfg.model], **model_args})
        if c.conditioning == "text":
            raise ValueError("model_overrides.conditioning=text trains on caption shards (mgvq cache-codes with "
                             "captions and --caption-encoder); data=synthetic has no captions")
        ds = SyntheticCodes(cfg.synthetic_size, c.grid, c.groups, c.codebook_size, c.num_classes, seed=cfg.seed)
        return ds, ds.meta
    from .data import CodeShardDataset

    ds = CodeShardDataset(cfg.data, groups=model_args.get("groups"), codebook_size=model_args.get("codebook_size"),
                          grid=model_args.get("grid"), view=cfg.view, seed=cfg.seed,
                          conditioning=model_args.get("conditioning"), caption_tokens=model_args.get("caption_tokens"))
    return ds, ds.meta


def model_overrides_from_meta(cfg: TrainConfig) -> dict:
    """GPTConfig overrides: G, K, grid and num_classes come from the shards' meta.json (explicit values must agree)."""
    args = dict(cfg.model_overrides)
    if cfg.data == "synthetic":
        bad = sorted(set(cfg.synthetic_meta) - {"groups", "codebook_size", "grid", "num_classes"})
        if bad:
            raise ValueError(f"synthetic_meta: unknown key(s) {bad}; valid: groups, codebook_size, grid, num_classes")
        return {**cfg.synthetic_meta, **args}
    from .data import read_meta

    meta = read_meta(cfg.data)
    grid = meta["grid"]
    if grid[0] != grid[1]:
        raise ValueError(f"{cfg.data}: non-square token grid {grid}; the GPT's 2D RoPE needs h == w")
    for k, v in (("groups", meta["groups"]), ("codebook_size", meta["codebook_size"]), ("grid", grid[0])):
        if k in args and args[k] != v:
            raise ValueError(f"model_overrides.{k}={args[k]} but the shards in {cfg.data!r} have {k}={v} (meta.json)")
        args[k] = v
    n = int(meta["num_classes"])
    if args.get("num_classes", n) < n:
        raise ValueError(f"model_overrides.num_classes={args['num_classes']} < {n} classes in {cfg.data!r}")
    args.setdefault("num_classes", n)
    feat = (meta.get("captions") or {}).get("features")
    if args.get("conditioning") == "text" and feat:  # caption width / length from the shards' caption encoder
        if args.get("caption_dim", feat["dim"]) != feat["dim"]:
            raise ValueError(f"model_overrides.caption_dim={args['caption_dim']} but the caption features in "
                             f"{cfg.data!r} have dim {feat['dim']} (meta.json captions.features)")
        args["caption_dim"] = feat["dim"]
        args.setdefault("caption_tokens", feat["max_length"])
    return args



# ----------------------------------------------------------------------------------------------------- model pieces


class LossModule(nn.Module):
    """What the launcher wraps (DDP / DeepSpeed engine): forward = GPT.compute_loss, so hooks and syncs run."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, codes, cond, cond_mask=None):  # cond: labels, or caption features + their mask (text)
        out = self.gpt.compute_loss(codes, cond, cond_mask)
        return out["loss"], out["group_losses"]


def _consolidate_deepspeed(ckpt_dir: str) -> dict:
    """fp32 master weights from a DeepSpeed ZeRO-1/2/3 checkpoint written by accelerate save_state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="pytorch_model")
    return {k[len("gpt."):] if k.startswith("gpt.") else k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    cfg: TrainConfig
    acc: object
    model: nn.Module  # LossModule as prepared (DDP / DeepSpeed engine)
    optimizer: object  # as prepared
    base_optimizer: torch.optim.Optimizer  # the torch AdamW (its param_groups carry the lr)
    gcfg: GPTConfig
    ds: object
    meta: dict
    identity: dict
    guard: NonFiniteGuard
    folder: ckpt.CheckpointFolder
    logger: MetricLogger | None = None
    ema: EMA | None = None
    decode_fn: object = None
    total: int = 0
    steps_per_epoch: int = 1
    accum: int = 1
    flops_per_seq: float = 0.0
    num_parameters: int = 0  # counted before the launcher wraps (ZeRO-3 partitions the parameters)
    step: int = 0
    last_ckpt: str | None = None
    sigterm: bool = False

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.acc)

    def gpt(self) -> GPT:
        return self.acc.unwrap_model(self.model).gpt


def load_codebook(cfg: TrainConfig, meta: dict) -> torch.Tensor | None:
    """codebook= a tokenizer folder (checked against the shards' tokenizer sha256) or a safetensors file."""
    if not cfg.codebook:
        return None
    from .convert import load_codebook_file, load_tokenizer_codebook

    if os.path.isdir(cfg.codebook):
        recorded = (meta.get("tokenizer") or {}).get("weights_sha256")
        check_same_tokenizer(cfg.codebook, recorded, f"{cfg.data}/meta.json")
        return load_tokenizer_codebook(cfg.codebook)[0]
    if not os.path.isfile(cfg.codebook):
        raise FileNotFoundError(f"codebook={cfg.codebook!r}: not found; valid: a tokenizer folder (model.safetensors "
                                f"+ config.json) or a safetensors file with the (G, K, C/G) code vectors")
    return load_codebook_file(cfg.codebook)


def build_model(cfg: TrainConfig, margs: dict, meta: dict, codebook: torch.Tensor | None) -> GPT:
    """The GPT (same init on every rank): a preset with the data's G/K/grid/classes, or `init_from` (checked)."""
    if codebook is None:
        codebook = load_codebook(cfg, meta)
    if cfg.init_from:
        keep = {k: v for k, v in margs.items() if k.endswith("_p") or k in ("class_dropout_prob", "grad_checkpointing")}
        gpt = GPT.from_pretrained(cfg.init_from, **keep)
    else:
        gpt = GPT.from_preset(cfg.model, codebook=codebook, **margs)
    gcfg = gpt.config
    for k in ("groups", "codebook_size", "grid"):  # init_from: the saved model must fit the data
        if k in margs and getattr(gcfg, k) != margs[k]:
            raise ValueError(f"init_from={cfg.init_from!r} has {k}={getattr(gcfg, k)} but the data {cfg.data!r} has "
                             f"{k}={margs[k]}; valid: a model trained on codes of the same tokenizer and grid")
    if gcfg.num_classes < int(meta.get("num_classes", 0)):
        raise ValueError(f"model num_classes={gcfg.num_classes} < {meta['num_classes']} classes in {cfg.data!r}")
    bad_cls = [c for c in (cfg.sample_classes or []) if c >= gcfg.num_classes and gcfg.conditioning == "class"]
    if bad_cls:
        raise ValueError(f"sample_classes={cfg.sample_classes}: {bad_cls} out of range; valid: 0.."
                         f"{gcfg.num_classes - 1}")
    if cfg.sample_top_k is not None and cfg.sample_top_k > gcfg.codebook_size:
        raise ValueError(f"sample_top_k={cfg.sample_top_k} is invalid; valid: 0..codebook_size={gcfg.codebook_size}")
    if cfg.compile or cfg.activation_checkpointing != "none":
        from .perf import optimize_for_training

        optimize_for_training(gpt, compile=cfg.compile, checkpointing=cfg.activation_checkpointing)
    return gpt


def setup(cfg: TrainConfig, decode_fn=None, codebook: torch.Tensor | None = None) -> tuple[Run, object]:
    """Accelerator (+ DeepSpeed), data, model, optimizer, EMA, resume; returns the run and its batch iterator."""
    acc = build_accelerator(cfg.precision, cfg.deepspeed, select_trackers(cfg.log_with), cfg.out_dir)
    from accelerate.utils import set_seed

    world, rank = acc.num_processes, acc.process_index
    if cfg.global_batch_size % (cfg.batch_size * world):
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not a multiple of batch_size x world size = "
                         f"{cfg.batch_size} x {world}; change batch_size (per device) or global_batch_size")
    accum = cfg.global_batch_size // (cfg.batch_size * world)
    acc.gradient_accumulation_steps = accum
    if is_deepspeed(acc):
        configure_deepspeed(acc, cfg.batch_size, accum, cfg.global_batch_size, cfg.grad_clip)
        if cfg.ema and zero_stage(acc) == 3:
            raise ValueError("ema=true is not supported under ZeRO-3 (parameters are sharded); use ZeRO-1/2 or DDP")
    set_seed(cfg.seed)
    margs = model_overrides_from_meta(cfg)
    ds, meta = build_dataset(cfg, margs)
    gpt = build_model(cfg, margs, meta, codebook)
    n_params = gpt.num_parameters()
    # minimal: room for one checkpoint (fp32 weights + 2 AdamW moments) and the exported weights
    check_output_dir(cfg.out_dir, need_bytes=n_params * 4 * 4, what="out_dir")
    n = len(ds)
    if n < cfg.global_batch_size:
        raise ValueError(f"dataset has {n} items < global_batch_size={cfg.global_batch_size}")
    if not is_deepspeed(acc):
        gpt.to(acc.device)  # before the optimizer: fused AdamW when every parameter is on CUDA
    opt = build_adamw(gpt.param_groups(cfg.weight_decay), cfg.lr, cfg.betas, eps=cfg.eps,
                      allow_fused=not is_deepspeed(acc))
    model, optimizer = acc.prepare(LossModule(gpt), opt)
    identity = {"model_config": asdict(gpt.config),
                "global_batch_size": cfg.global_batch_size, "seed": cfg.seed, "data": cfg.data, "num_items": n,
                "world_size": world if is_deepspeed(acc) else None}
    run = Run(cfg, acc, model, optimizer, opt, gpt.config, ds, meta, identity,
              NonFiniteGuard(cfg.max_nonfinite, log=acc.print),
              ckpt.CheckpointFolder(cfg.out_dir, cfg.keep_checkpoints, acc.is_main_process, acc.wait_for_everyone),
              ema=EMA(acc.unwrap_model(model).gpt, cfg.ema_decay) if cfg.ema else None, decode_fn=decode_fn,
              steps_per_epoch=n // cfg.global_batch_size, accum=accum,
              flops_per_seq=gpt.flops_per_token() * gpt.config.block_size, num_parameters=n_params)
    run.total = cfg.steps or cfg.epochs * run.steps_per_epoch
    run.folder.clean_partial()
    acc.wait_for_everyone()
    path = run.folder.resolve(cfg.resume)
    if path is not None:
        resume(run, path)
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout / label-dropout stream per rank
    if run.main:
        write_json(os.path.join(cfg.out_dir, "config.json"), {
            "train": to_dict(cfg), "model": identity["model_config"], "world_size": world, "grad_accum": accum,
            "zero_stage": run.zero_stage, "num_parameters": n_params})
    run.logger = MetricLogger(acc, cfg.out_dir, select_trackers(cfg.log_with), to_dict(cfg))
    sampler = StepBatches(n, cfg.global_batch_size, cfg.batch_size, world, rank, cfg.seed, run.step, run.total)
    loader = torch.utils.data.DataLoader(EpochIndexed(ds), batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=torch.cuda.is_available(),
                                         generator=torch.Generator().manual_seed(cfg.seed))
    acc.print(f"GPT {cfg.model}: {n_params / 1e6:.2f}M params, G={gpt.config.groups} "
              f"K={gpt.config.codebook_size} grid={gpt.config.grid} | {n} items, {run.steps_per_epoch} steps/epoch, "
              f"{run.total} steps | world {world} x batch {cfg.batch_size} x accum {accum} = {cfg.global_batch_size} | "
              f"{acc.distributed_type.value}{f' ZeRO-{run.zero_stage}' if is_deepspeed(acc) else ''} | precision "
              f"{acc.mixed_precision}")
    return run, iter(loader)


# ----------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> str:
    def write(d):
        if is_deepspeed(run.acc):  # every rank writes its ZeRO shards (DeepSpeed's format)
            run.model.save_checkpoint(str(d), "pytorch_model")
        elif run.main:
            ckpt.save_module(d / "model", run.gpt())
            ckpt.save_optimizer(d / "model", run.base_optimizer)
        if run.main and run.ema is not None:
            ckpt.save_module(d / "ema", run.ema.state_dict())
        ckpt.save_rng(d / f"rng_rank{run.acc.process_index}")

    state = {"identity": run.identity, "config": to_dict(run.cfg), "guard": run.guard.state_dict()}
    run.last_ckpt = str(run.folder.save(run.step, write, state))
    return run.last_ckpt


def resume(run: Run, path) -> None:
    state = run.folder.read_state(path)
    ckpt.check_identity(state["identity"], run.identity, str(path))
    if is_deepspeed(run.acc):
        run.model.load_checkpoint(str(path), "pytorch_model", load_module_strict=True, load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
    else:
        ckpt.load_module(path / "model", run.gpt())
        ckpt.load_optimizer(path / "model", run.base_optimizer)
    if run.ema is not None:
        run.ema.load_state_dict(ckpt.load_tensors(path / "ema.safetensors"))
    ckpt.load_rng(path / f"rng_rank{run.acc.process_index}")
    run.guard.load_state_dict(state["guard"])
    run.step = state["step"]
    if run.main:  # drop lines past the checkpoint (they are recomputed identically)
        ckpt.truncate_metrics(os.path.join(run.cfg.out_dir, "metrics.jsonl"), run.step)
    run.acc.print(f"resumed from {path} at step {run.step}")


# ------------------------------------------------------------------------------------------------------- one step


def train_step(run: Run, batches) -> tuple[torch.Tensor, float, bool]:
    """One optimizer step over `accum` micro-batches. Returns (stats, grad norm, skipped); stats (summed over ranks) =
    [loss, G group losses, non-finite micro-batches, SIGTERM flag]. A non-finite loss or gradient skips the update."""
    acc, cfg, G = run.acc, run.cfg, run.gcfg.groups
    set_lr(run.base_optimizer, lr_at(run.step, run.total, cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr))
    stats = torch.zeros(3 + G, device=acc.device)
    engine = run.model if is_deepspeed(acc) else None
    skipped_before = engine.skipped_steps if engine is not None else 0
    for _ in range(run.accum):
        codes, *cond = (t.to(acc.device, non_blocking=True) for t in next(batches))  # cond: labels | feats, mask
        with acc.accumulate(run.model), acc.autocast():
            loss, group_losses = run.model(codes, *cond)
            stats[0] += loss.detach().float() / run.accum
            stats[1:1 + G] += group_losses.detach().float() / run.accum
            stats[1 + G] += (~torch.isfinite(loss.detach())).float()
            acc.backward(loss)
    stats[2 + G] = float(run.sigterm)
    if acc.num_processes > 1:
        stats = acc.reduce(stats, "sum")
    nonfinite = bool(stats[1 + G] > 0)
    if engine is not None:  # the engine stepped inside backward(); it skips steps whose gradients are not finite
        gn = engine.get_global_grad_norm()
        grad_norm = float(gn) if gn is not None else float("nan")
        skipped = engine.skipped_steps > skipped_before
        if nonfinite and not skipped:
            raise RuntimeError(f"step {run.step + 1}: non-finite loss but DeepSpeed applied the update")
    else:
        grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30))
        skipped = nonfinite or not math.isfinite(grad_norm)
        if not skipped:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.guard.record(not skipped, run.step, "", (run.last_ckpt or run.folder.latest()) if skipped else None)
    if not skipped and run.ema is not None:
        run.ema.update(run.gpt())
    return stats, grad_norm, skipped


def log_step(run: Run, stats: torch.Tensor, grad_norm: float, seconds: float, steps: int) -> dict:
    cfg, world, G = run.cfg, run.acc.num_processes, run.gcfg.groups
    seqs = steps * cfg.global_batch_size
    rec = {"step": run.step, "epoch": (run.step - 1) // run.steps_per_epoch, "loss": float(stats[0]) / world,
           "group_losses": [float(x) / world for x in stats[1:1 + G]],
           "lr": run.base_optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
           "skipped_steps": run.guard.skipped_steps, "tokens_per_s": seqs * run.gcfg.block_size / seconds,
           "seqs_per_s": seqs / seconds,
           "mfu": (run.flops_per_seq * seqs / seconds / (cfg.peak_tflops * 1e12 * world)) if cfg.peak_tflops else None}
    run.logger.log(rec, run.step)
    return rec


# ------------------------------------------------------------------------------------------------ samples / export


def code_map_images(codes: torch.Tensor, codebook_size: int, scale: int = 8) -> np.ndarray:
    """(B, h, w, G) codes -> (B, h*scale, w*scale, 3) uint8: group 0's code map in a fixed random palette."""
    palette = np.random.default_rng(0).integers(0, 256, (codebook_size, 3), dtype=np.uint8)
    img = palette[codes[..., 0].cpu().numpy()]  # (B, h, w, 3)
    return img.repeat(scale, 1).repeat(scale, 2)


def _sampling_model(run: Run) -> GPT | None:
    """The live GPT, or (ZeRO-3) a gathered copy on the main process; None on the other ranks."""
    live = run.gpt()
    if run.zero_stage != 3:
        return live
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(live.parameters()), modifier_rank=None):
        sd = {k: v.detach().clone() for k, v in live.state_dict().items()} if run.main else None
    if not run.main:
        return None
    with torch.random.fork_rng(devices=[]):  # a fresh init must not move the training RNG stream
        model = GPT(run.gcfg, codebook=sd.get("codebook")).to(run.acc.device)
    model.load_state_dict(sd)
    return model


def sample(run: Run) -> None:
    """Codes for `sample_classes` (one labelled row per class) -> samples/step_N.safetensors + .png (decoded with
    `decode_fn` when given, else group 0's code map) + the trackers."""
    cfg = run.cfg
    labels = cfg.sample_classes if cfg.sample_classes is not None else list(range(min(8, run.gcfg.num_classes)))
    text = run.gcfg.conditioning == "text"
    if text:  # the captions of the first items (sample_classes: their indices); rows labelled with the captions
        items = EpochIndexed(run.ds).__getitems__([(0, i) for i in (cfg.sample_classes or range(min(8, len(run.ds))))])
        cond = dict(cond=torch.stack([f for _, f, _ in items]).to(run.acc.device),
                    cond_mask=torch.stack([m for _, _, m in items]).to(run.acc.device))
        row_names = run.ds.captions(cfg.sample_classes or range(len(items)))
    else:
        cond = dict(cond=torch.tensor(labels))
    model = _sampling_model(run)
    if run.main and labels:
        from .generate import generate

        names = run.meta.get("class_names") or []
        gen = torch.Generator(device=run.acc.device).manual_seed(cfg.seed)
        with torch.no_grad(), run.acc.autocast():
            codes = generate(model, **cond, guidance_scale=cfg.sample_cfg_scale,
                             temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, generator=gen)
        base = os.path.join(cfg.out_dir, "samples", ckpt.step_dir_name(run.step))
        os.makedirs(os.path.dirname(base), exist_ok=True)
        save_tensors(base + ".safetensors", {"codes": codes, "labels": torch.tensor(labels)} if not text else
                     {"codes": codes, "caption_features": cond["cond"], "caption_mask": cond["cond_mask"]})
        if run.decode_fn is not None:
            with torch.no_grad():
                images = to_uint8(run.decode_fn(codes).float(), (-1.0, 1.0))
        else:
            images = code_map_images(codes, run.gcfg.codebook_size)
        save_grid(images, base + ".png", ncol=1,
                  row_labels=row_names if text else [names[c] if c < len(names) else f"class {c}" for c in labels])
        run.logger.log_images("samples", images, run.step, base + ".png")
    run.model.train()
    run.acc.wait_for_everyone()


def _eval_batch(run: Run):
    items = EpochIndexed(run.ds).__getitems__([(0, i) for i in range(min(run.cfg.batch_size, len(run.ds)))])
    return tuple(torch.stack(col).to(run.acc.device) for col in zip(*items))  # codes, labels | codes, feats, mask


def export(run: Run) -> dict:
    """Eval loss on a fixed batch, final/ (+ final_ema/) weights with id2label.json, checked by reloading them."""
    run.model.eval()
    codes, *labels = _eval_batch(run)  # labels: [labels] | [caption features, mask]
    with torch.no_grad(), run.acc.autocast():
        eval_loss = float(run.model(codes, *labels)[0])
    final_dir = os.path.join(run.cfg.out_dir, "final")
    ckpt_dir = run.last_ckpt or str(run.folder.latest())
    summary = {"step": run.step, "skipped_steps": run.guard.skipped_steps, "final_eval_loss": eval_loss,
               "eval_items": len(codes), "checkpoint": ckpt_dir, "num_parameters": run.num_parameters,
               "zero_stage": run.zero_stage, "world_size": run.acc.num_processes,
               "precision": run.acc.mixed_precision,
               # which tokenizer made the codes (shards' meta.json); `mgvq convert --from pipeline` checks it
               "tokenizer_sha256": (run.meta.get("tokenizer") or {}).get("weights_sha256")}
    run.acc.wait_for_everyone()
    if run.main:
        if is_deepspeed(run.acc):
            sd = _consolidate_deepspeed(ckpt_dir)
        else:
            sd = {k: v.detach().float().cpu() for k, v in run.gpt().state_dict().items()}
        exported = GPT(run.gcfg, codebook=sd.get("codebook"))
        exported.load_state_dict(sd, strict=True)
        exported.save_pretrained(final_dir)
        with torch.no_grad():
            summary["export_eval_loss"] = float(exported.eval().compute_loss(codes.cpu(),
                                                                             *(t.cpu() for t in labels))["loss"])
        if run.acc.mixed_precision == "no" and abs(summary["export_eval_loss"] - eval_loss) > 1e-4 * max(1, eval_loss):
            raise RuntimeError(f"export check failed: the exported weights give eval loss "
                               f"{summary['export_eval_loss']:.6f} but the trained model {eval_loss:.6f}")
        if run.ema is not None:
            exported.load_state_dict({**sd, **run.ema.state_dict()}, strict=True)
            exported.save_pretrained(os.path.join(run.cfg.out_dir, "final_ema"))
        write_json(os.path.join(final_dir, "id2label.json"),
                   {str(i): c for i, c in enumerate(run.meta.get("class_names", []))})
        write_json(os.path.join(final_dir, "train_summary.json"), summary)
        print(f"done: step {run.step}, eval loss {eval_loss:.4f} (export {summary['export_eval_loss']:.4f}), "
              f"{run.guard.skipped_steps} skipped steps -> {final_dir}", flush=True)
    run.acc.wait_for_everyone()
    return summary


# ------------------------------------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, decode_fn=None, codebook: torch.Tensor | None = None) -> dict:
    """Train; returns the summary dict (also written to <out_dir>/final/train_summary.json on the main process).

    decode_fn: optional callable codes (B, h, w, G) int64 -> images (B, 3, H, W) in [-1, 1] for the sample grids
    (pipelines pass the tokenizer's decode); without it the grids show code maps.
    codebook: frozen (G, K, C/G) tokenizer code vectors for input_mode=projector (else read from cfg.codebook).
    """
    check_output_dir(cfg.out_dir, what="out_dir")  # an unwritable out_dir or a full disk fails now, not later
    with RunLock(cfg.out_dir, "out_dir", enabled=launched_rank() == 0):
        run, batches = setup(cfg, decode_fn, codebook)
        from tqdm import tqdm

        bar = tqdm(total=run.total, initial=run.step, desc="train", disable=not run.main, dynamic_ncols=True)
        prev_handler = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(run, "sigterm", True))
        t_log, since_log = time.perf_counter(), 0
        run.model.train()
        try:
            while run.step < run.total:
                stats, grad_norm, _ = train_step(run, batches)
                bar.update(1)
                since_log += 1
                if run.step % cfg.log_every == 0 or run.step == run.total:
                    rec = log_step(run, stats, grad_norm, time.perf_counter() - t_log, since_log)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
                    t_log, since_log = time.perf_counter(), 0
                if bool(stats[-1] > 0):  # SIGTERM on any rank: every rank saves and stops
                    save_checkpoint(run)
                    run.acc.print(f"SIGTERM: saved {run.last_ckpt} at step {run.step}; run the same command again "
                                  f"to continue")
                    return {"step": run.step, "stopped_by": "SIGTERM", "checkpoint": run.last_ckpt}
                if run.step % cfg.save_every == 0 or run.step == run.total:
                    save_checkpoint(run)
                if cfg.sample_every and run.step % cfg.sample_every == 0 and run.step < run.total:
                    sample(run)
                if run.step % cfg.log_every == 0:
                    t_log = time.perf_counter()  # exclude checkpoint / sampling time from throughput
            sample(run)
            return export(run)
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, prev_handler)
            run.logger.close()


# ------------------------------------------------------------------------------------------------------------- CLI


def parser(prog: str = "python -m generator.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with TrainConfig fields (configs/generator/*.yaml)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for the MFU estimate (H100/H200 bf16 dense: 989, A100: 312)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=2e-4 steps=100 model_overrides.dim=512")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides) + ([f"peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # key=value may come before or after the flags
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    summary = train(cfg)
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
