"""Stage two: train the class-conditional GPT on cached MGVQ codes (accelerate; DDP or DeepSpeed ZeRO-1/2/3).

One linear, launcher-agnostic script. The same file runs on a laptop CPU and on many GPU nodes:

    python -m generator.train --config configs/generator/tiny.yaml data=shards/fmnist out=runs/gen-tiny
    accelerate launch --config_file configs/accelerate/zero2.yaml -m generator.train --config configs/generator/gpt-b.yaml
    torchrun --nproc_per_node 8 -m generator.train --config configs/generator/gpt-xxl.yaml deepspeed=configs/deepspeed/zero3.json

Recipe (LlamaGen `train_c2i.py`): AdamW betas (0.9, 0.95), weight decay 0.05 on >=2-D params only, lr 1e-4 constant,
grad clip 1.0, bf16 autocast, global batch 256 (gradient accumulation fills it from batch_size x world size), 300 epochs.

Determinism and resumption: the data order is a pure function of (seed, step) (one permutation per epoch, one global
batch per step, split into micro-batches per rank), the augmented view of an item a pure function of
(seed, epoch, index), and every rank's RNG state is part of the checkpoint. So a run killed at any point and started
again with the same command continues from its last checkpoint and reaches the same weights as an uninterrupted run
(bit-exact on the CPU). Checkpoints are written to a temp dir and renamed (atomic); SIGTERM saves one and exits.
A non-finite loss never reaches the weights: the step is skipped and counted; `max_nonfinite_in_row` in a row stop
the run. This module never imports `tokenizer/`; decoded sample images come from a `decode_fn` given to `train()`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn

from .model import GPT, PRESETS, GPTConfig
from .outdir import check_output_dir

EXAMPLE = """examples:
  # CPU, tiny model on code shards written by `mgvq cache-codes`:
  python -m generator.train --config configs/generator/tiny.yaml data=shards/fmnist-train out=runs/gen-tiny
  # 8 GPUs, ZeRO-2 (any YAML key can be overridden with key=value; model fields with model_args.<field>=...):
  accelerate launch --config_file configs/accelerate/zero2.yaml -m generator.train \\
      --config configs/generator/gpt-b.yaml data=shards/imagenet-train out=runs/gpt-b --peak-tflops 989
  # synthetic data (benchmarking), 20 steps:
  python -m generator.train --config configs/generator/tiny.yaml data=synthetic max_steps=20 out=/tmp/gen
"""


# ---------------------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    # model
    model: str = "GPT-B"  # preset name (generator.model.PRESETS)
    model_args: dict = field(default_factory=dict)  # GPTConfig overrides: dropouts, head, input_mode, grad_checkpointing...
    init_from: str | None = None  # start from a save_pretrained folder instead of a fresh init
    codebook: str | None = None  # input_mode=projector: safetensors file with key "codebook" (G, K, C/G)
    # data
    data: str = "synthetic"  # code-shard dir (meta.json + Parquet) or "synthetic"
    view: str = "random"  # "random" or an int view index (0 = centre crop)
    synthetic_size: int = 4096  # items in the synthetic dataset (codes drawn around one template per class)
    synthetic_meta: dict = field(default_factory=dict)  # data=synthetic only: groups/codebook_size/grid/num_classes
    num_workers: int = 2
    # optimisation (LlamaGen recipe)
    global_batch_size: int = 256
    batch_size: int = 32  # per device micro-batch; accumulation = global / (batch_size * world)
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" | "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    epochs: int = 300
    max_steps: int | None = None  # overrides epochs
    precision: str = "auto"  # "auto" (launcher's choice, else bf16 on GPUs with bf16, fp32 elsewhere) | "bf16" | "fp32"
    ema: bool = False
    ema_decay: float = 0.9999
    deepspeed: str | None = None  # DeepSpeed JSON when not launched with an accelerate DeepSpeed config
    seed: int = 0
    # run
    out: str = "runs/generator"
    resume: str = "auto"  # "auto" (latest checkpoint in out/checkpoints) | "none" | a checkpoint dir
    ckpt_every: int = 1000  # steps
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 5000  # 0 = only at the end
    sample_classes: list | None = None  # default: the first 8 classes
    sample_cfg_scale: float = 4.0
    sample_temperature: float = 1.0
    sample_top_k: int | None = None
    peak_tflops: float | None = None  # device peak for MFU (H100/H200 bf16 dense: 989)
    max_nonfinite_in_row: int = 10
    inject_nan_at: list = field(default_factory=list)  # fault injection: rank 0's loss is NaN at these steps (1-based)
    tensorboard: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model not in PRESETS:
            bad("model", f"unknown preset; valid: {', '.join(PRESETS)}")
        known = {f.name for f in fields(GPTConfig)}
        unknown = sorted(set(self.model_args) - known)
        if unknown:
            bad("model_args", f"unknown GPTConfig field(s) {unknown}; valid: {sorted(known)}")
        for name in ("global_batch_size", "batch_size", "epochs", "ckpt_every", "keep_last", "log_every",
                     "max_nonfinite_in_row", "synthetic_size"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be >= 1 (or null to use epochs)")
        if self.global_batch_size % self.batch_size:
            bad("global_batch_size", f"must be a multiple of batch_size={self.batch_size}")
        if self.lr_schedule not in ("constant", "cosine"):
            bad("lr_schedule", "valid: 'constant', 'cosine'")
        if self.precision not in ("auto", "bf16", "fp32"):
            bad("precision", "valid: 'auto', 'bf16', 'fp32'")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            bad("lr", "lr must be > 0, grad_clip and weight_decay >= 0")
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


def _coerce(name: str, typ: str, value):
    """YAML gives strings for '1e-4' and such: coerce by the field's annotation."""
    if value is None or not isinstance(value, str):
        if "float" in typ and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if value.lower() in ("null", "none", "~") and "None" in typ:
        return None
    try:
        if typ.startswith("float"):
            return float(value)
        if typ.startswith("int"):
            return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {typ}") from None
    return value


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """TrainConfig defaults <- YAML file <- key=value overrides (dotted `model_args.<field>=...` allowed)."""
    import yaml

    d: dict = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} not found")
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for ov in overrides:
            if "=" not in ov:
                raise ValueError(f"override {ov!r}: expected key=value (e.g. lr=2e-4 or model_args.dim=512)")
            k, v = ov.split("=", 1)
            parsed.append((k.strip(), yaml.safe_load(v)))
        items = parsed
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    for k, v in items:
        if k.startswith("model_args."):
            d.setdefault("model_args", {})
            d["model_args"] = {**(d["model_args"] or {}), k.split(".", 1)[1]: v}
        else:
            d[k] = v
    unknown = sorted(set(d) - set(types))
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, types, 1)) else u for u in unknown]
        raise ValueError(f"unknown training config key(s): {', '.join(hints)}; valid keys: {sorted(types)}")
    d = {k: _coerce(k, types[k], v) for k, v in d.items()}
    if d.get("model_args") is None:
        d["model_args"] = {}
    gtypes = {f.name: str(f.type) for f in fields(GPTConfig)}
    d["model_args"] = {k: _coerce(f"model_args.{k}", gtypes.get(k, ""), v) for k, v in d["model_args"].items()}
    return TrainConfig(**d)


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
        ds = SyntheticCodes(cfg.synthetic_size, c.grid, c.groups, c.codebook_size, c.num_classes, seed=cfg.seed)
        return ds, ds.meta
    from .data import CodeShardDataset

    ds = CodeShardDataset(cfg.data, groups=model_args.get("groups"), codebook_size=model_args.get("codebook_size"),
                          grid=model_args.get("grid"), view=cfg.view, seed=cfg.seed)
    return ds, ds.meta


def model_args_from_meta(cfg: TrainConfig) -> dict:
    """GPTConfig overrides: G, K, grid and num_classes come from the shards' meta.json (explicit values must agree)."""
    args = dict(cfg.model_args)
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
            raise ValueError(f"model_args.{k}={args[k]} but the shards in {cfg.data!r} have {k}={v} (meta.json)")
        args[k] = v
    n = int(meta["num_classes"])
    if args.get("num_classes", n) < n:
        raise ValueError(f"model_args.num_classes={args['num_classes']} < {n} classes in {cfg.data!r}")
    args.setdefault("num_classes", n)
    return args


# ----------------------------------------------------------------------------------------------------- model pieces


class LossModule(nn.Module):
    """What the launcher wraps (DDP / DeepSpeed engine): forward = GPT.compute_loss, so hooks and syncs run."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, codes, labels):
        out = self.gpt.compute_loss(codes, labels)
        return out["loss"], out["group_losses"]


def param_groups(model: nn.Module, weight_decay: float):
    """LlamaGen: decay >=2-D params (matrices, embeddings), not norms/biases/1-D."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flops_per_sequence(gpt: GPT) -> float:
    """Training FLOPs (fwd + bwd) of one image sequence: 6 x matmul params x tokens they see + attention (PaLM)."""
    c = gpt.config
    L = c.block_size
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dense = numel(gpt.layers) + numel(gpt.norm)
    if c.input_mode == "projector":
        dense += numel(gpt.img_projector)
    flops = 6 * dense * L + 12 * c.n_layer * c.dim * L * L  # attention: QK^T and AV, fwd + bwd
    if c.head == "parallel":
        flops += 6 * numel(gpt.output) * L
    else:  # the AR head runs on G + 1 tokens per position
        h = gpt.ar_head
        head_dense = numel(h.causal_space_blocks) + numel(h.ln_f) + numel(h.head)
        T = c.groups + 1
        flops += 6 * head_dense * T * L + 12 * c.ar_head_layers * c.dim * T * T * L
    return float(flops)


class EMA:
    """fp32 exponential moving average of the parameters (replicated on every rank; not under ZeRO-3)."""

    def __init__(self, gpt: GPT, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in gpt.named_parameters()}

    @torch.no_grad()
    def update(self, gpt: GPT):
        for n, p in gpt.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, sd):
        self.decay = sd["decay"]
        for n, t in sd["shadow"].items():
            self.shadow[n].copy_(t)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """lr for 0-based step: linear warmup, then constant or cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------------- images / io


def code_map_images(codes: torch.Tensor, codebook_size: int, scale: int = 8) -> np.ndarray:
    """(B, h, w, G) codes -> (B, h*scale, w*scale, 3) uint8: group 0's code map in a fixed random palette."""
    palette = np.random.default_rng(0).integers(0, 256, (codebook_size, 3), dtype=np.uint8)
    img = palette[codes[..., 0].cpu().numpy()]  # (B, h, w, 3)
    return img.repeat(scale, 1).repeat(scale, 2)


def save_grid(images: np.ndarray, path: str, ncol: int = 8, pad: int = 2) -> None:
    """(B, H, W, 3) uint8 -> PNG grid."""
    from PIL import Image

    B, H, W, _ = images.shape
    ncol = min(ncol, B)
    nrow = (B + ncol - 1) // ncol
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = images[i]
    Image.fromarray(grid).save(path)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def list_checkpoints(out: str) -> list[str]:
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return []
    names = sorted(n for n in os.listdir(d)
                   if n.startswith("step_") and os.path.isfile(os.path.join(d, n, "train_state.json")))
    return [os.path.join(d, n) for n in names]


def _consolidate_deepspeed(ckpt_dir: str) -> dict:
    """fp32 master weights from a DeepSpeed ZeRO-1/2/3 checkpoint written by accelerate save_state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="pytorch_model")
    return {k[len("gpt."):] if k.startswith("gpt.") else k: v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------------------ train


def _resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision == "bf16":
        return "bf16"
    if cfg.precision == "fp32":
        return "no"
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env:
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _single_process_env() -> None:
    """DeepSpeed outside a launcher: pretend to be rank 0 of 1 (else it tries MPI discovery)."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def train(cfg: TrainConfig, decode_fn=None, codebook: torch.Tensor | None = None) -> dict:
    """Train; returns the summary dict (also written to <out>/final/train_summary.json on the main process).

    decode_fn: optional callable codes (B, h, w, G) int64 -> images (B, 3, H, W) in [-1, 1] for the sample grids
    (pipelines pass the tokenizer's decode); without it the grids show code maps.
    codebook: frozen (G, K, C/G) tokenizer code vectors for input_mode=projector (else read from cfg.codebook).
    """
    check_output_dir(cfg.out, what="out")  # an unwritable out= or a full disk fails now, not at the first checkpoint
    use_ds_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if (cfg.deepspeed or use_ds_env) and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.deepspeed:
        if use_ds_env:
            raise ValueError("deepspeed= was given but the launcher already configures DeepSpeed "
                             "(accelerate launch with a DeepSpeed config): use one of the two")
        if not os.path.isfile(cfg.deepspeed):
            raise FileNotFoundError(f"deepspeed={cfg.deepspeed!r}: DeepSpeed JSON not found")
        _single_process_env()

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, set_seed

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.deepspeed or use_ds_env
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed) if cfg.deepspeed else None
    # plain DDP on CPU needs cpu=True (else accelerate 1.15 silently picks no distribution); cpu=True would disable
    # DeepSpeed, so only without it
    plain_cpu = not torch.cuda.is_available() and not (cfg.deepspeed or use_ds_env)
    acc = Accelerator(cpu=plain_cpu, mixed_precision=_resolve_precision(cfg), deepspeed_plugin=plugin,
                      kwargs_handlers=kwargs)
    is_ds = acc.distributed_type == DistributedType.DEEPSPEED
    if distributed and acc.num_processes > 1 and acc.distributed_type == DistributedType.NO:
        raise RuntimeError(f"launched with {acc.num_processes} processes but accelerate chose no distribution; "
                           f"gradients would not be synchronised")
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    zero_stage = acc.state.deepspeed_plugin.zero_stage if is_ds else 0
    if cfg.global_batch_size % (cfg.batch_size * world):
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not a multiple of batch_size x world size = "
                         f"{cfg.batch_size} x {world}; change batch_size (per device) or global_batch_size")
    accum = cfg.global_batch_size // (cfg.batch_size * world)
    acc.gradient_accumulation_steps = accum
    if is_ds:
        dsc = acc.state.deepspeed_plugin.deepspeed_config
        owned = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": accum,
                 "train_batch_size": cfg.global_batch_size, "gradient_clipping": cfg.grad_clip}
        for k, v in owned.items():
            if dsc.get(k, "auto") not in ("auto", v):
                raise ValueError(f"DeepSpeed config sets {k}={dsc[k]} but the training config implies {v}; set it "
                                 f"to \"auto\" in the JSON (the training config owns batch sizes and clipping)")
            dsc[k] = v
        if "optimizer" in dsc or "scheduler" in dsc:
            raise ValueError("the DeepSpeed JSON must not define optimizer/scheduler: the script passes torch AdamW "
                             "and sets the lr itself")
        if cfg.ema and zero_stage == 3:
            raise ValueError("ema=true is not supported under ZeRO-3 (parameters are sharded); use ZeRO-1/2 or DDP")

    # ---- data + model (same init on every rank)
    set_seed(cfg.seed)
    margs = model_args_from_meta(cfg)
    ds, meta = build_dataset(cfg, margs)
    if codebook is None and cfg.codebook:
        from safetensors.torch import load_file

        codebook = load_file(cfg.codebook)["codebook"]
    if cfg.init_from:
        gpt = GPT.from_pretrained(cfg.init_from, **{k: v for k, v in margs.items()
                                                    if k.endswith("_p") or k in ("class_dropout_prob",
                                                                                 "grad_checkpointing")})
    else:
        gpt = GPT.from_preset(cfg.model, codebook=codebook, **margs)
    gcfg = gpt.config
    for k in ("groups", "codebook_size", "grid"):  # init_from: the saved model must fit the data
        if k in margs and getattr(gcfg, k) != margs[k]:
            raise ValueError(f"init_from={cfg.init_from!r} has {k}={getattr(gcfg, k)} but the data {cfg.data!r} has "
                             f"{k}={margs[k]}; valid: a model trained on codes of the same tokenizer and grid")
    if gcfg.num_classes < int(meta.get("num_classes", 0)):
        raise ValueError(f"model num_classes={gcfg.num_classes} < {meta['num_classes']} classes in {cfg.data!r}")
    bad_cls = [c for c in (cfg.sample_classes or []) if c >= gcfg.num_classes]
    if bad_cls:
        raise ValueError(f"sample_classes={cfg.sample_classes}: {bad_cls} out of range; valid: 0.."
                         f"{gcfg.num_classes - 1}")
    if cfg.sample_top_k is not None and cfg.sample_top_k > gcfg.codebook_size:
        raise ValueError(f"sample_top_k={cfg.sample_top_k} is invalid; valid: 0..codebook_size={gcfg.codebook_size}")
    n_params = gpt.num_parameters()
    # minimal: room for one checkpoint (fp32 weights + 2 AdamW moments) and the exported weights
    check_output_dir(cfg.out, need_bytes=n_params * 4 * 4, what="out")
    fps = flops_per_sequence(gpt)
    L, G = gcfg.block_size, gcfg.groups
    n = len(ds)
    if n < cfg.global_batch_size:
        raise ValueError(f"dataset has {n} items < global_batch_size={cfg.global_batch_size}")
    steps_per_epoch = n // cfg.global_batch_size
    total = cfg.max_steps or cfg.epochs * steps_per_epoch

    opt = torch.optim.AdamW(param_groups(gpt, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, fused=torch.cuda.is_available() and not is_ds)
    model, optimizer = acc.prepare(LossModule(gpt), opt)
    ema = EMA(acc.unwrap_model(model).gpt, cfg.ema_decay) if cfg.ema else None
    if ema is not None:
        acc.register_for_checkpointing(ema)
    base_groups = opt.param_groups  # the torch AdamW's groups (DeepSpeed wraps, never copies them)

    # ---- outputs, resume
    out = cfg.out
    if main:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        for name in os.listdir(os.path.join(out, "checkpoints")):  # partial saves of a killed run
            if name.startswith(".tmp_"):
                shutil.rmtree(os.path.join(out, "checkpoints", name), ignore_errors=True)
    acc.wait_for_everyone()
    state = {"step": 0, "skipped_steps": 0, "nonfinite_in_row": 0}
    ckpt = None
    if cfg.resume == "auto":
        found = list_checkpoints(out)
        ckpt = found[-1] if found else None
    elif cfg.resume != "none":
        ckpt = cfg.resume
        if not os.path.isfile(os.path.join(ckpt, "train_state.json")):
            raise FileNotFoundError(f"resume={ckpt!r}: not a checkpoint dir (no train_state.json)")
    run_identity = {"model_config": asdict(gcfg), "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                    "data": cfg.data, "num_items": n, "world_size": world if is_ds else None}
    if ckpt:
        with open(os.path.join(ckpt, "train_state.json")) as f:
            saved = json.load(f)
        for k, v in run_identity.items():
            if json.dumps(saved["identity"].get(k), sort_keys=True) != json.dumps(v, sort_keys=True):
                raise ValueError(f"cannot resume from {ckpt}: {k} differs (checkpoint: {saved['identity'].get(k)!r}, "
                                 f"now: {v!r}); use a new out= or resume=none")
        acc.load_state(ckpt)
        state = saved["state"]
        if main:
            print(f"resumed from {ckpt} at step {state['step']}", flush=True)
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout / label-dropout stream per rank
    start = state["step"]
    if main:
        _write_json(os.path.join(out, "config.json"), {"train": asdict(cfg), "model": asdict(gcfg),
                                                       "world_size": world, "grad_accum": accum,
                                                       "zero_stage": zero_stage, "num_parameters": n_params})
        metrics_path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(metrics_path):  # drop lines past the checkpoint (they are recomputed identically)
            with open(metrics_path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start]
            with open(metrics_path, "w") as f:
                f.writelines(keep)
    writer = None
    if main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tb"))

    sampler = StepBatches(n, cfg.global_batch_size, cfg.batch_size, world, rank, cfg.seed, start, total)
    loader = torch.utils.data.DataLoader(EpochIndexed(ds), batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=torch.cuda.is_available(),
                                         generator=torch.Generator().manual_seed(cfg.seed))
    it = iter(loader)

    sample_labels = cfg.sample_classes if cfg.sample_classes is not None else list(range(min(8, gcfg.num_classes)))

    def sample(step: int):
        gpt_live = acc.unwrap_model(model).gpt
        sampler_model = gpt_live
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(gpt_live.parameters()), modifier_rank=None):
                sd = {k: v.detach().clone() for k, v in gpt_live.state_dict().items()} if main else None
            if main:
                sampler_model = GPT(gcfg, codebook=sd.get("codebook")).to(acc.device)
                sampler_model.load_state_dict(sd)
        if main and sample_labels:
            gen = torch.Generator(device=acc.device).manual_seed(cfg.seed)
            from .generate import generate

            with acc.autocast():
                codes = generate(sampler_model, torch.tensor(sample_labels), guidance_scale=cfg.sample_cfg_scale,
                                 temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, generator=gen)
            from safetensors.torch import save_file

            base = os.path.join(out, "samples", f"step_{step:08d}")
            save_file({"codes": codes.cpu().contiguous(), "labels": torch.tensor(sample_labels)}, base + ".safetensors")
            if decode_fn is not None:
                with torch.no_grad():
                    imgs = decode_fn(codes).float().clamp(-1, 1)
                imgs = ((imgs + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            else:
                imgs = code_map_images(codes, gcfg.codebook_size)
            save_grid(imgs, base + ".png")
            if writer is not None:
                writer.add_images("samples", imgs, step, dataformats="NHWC")
        acc.wait_for_everyone()

    def save(step: int):
        ckdir = os.path.join(out, "checkpoints")
        final, tmp = os.path.join(ckdir, f"step_{step:08d}"), os.path.join(ckdir, f".tmp_step_{step:08d}")
        if main and os.path.exists(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if main:
            _write_json(os.path.join(tmp, "train_state.json"), {"state": state, "identity": run_identity,
                                                                "config": asdict(cfg)})
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(out)[:-cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    sigterm = {"got": False}

    def on_sigterm(signum, frame):
        sigterm["got"] = True

    prev_handler = signal.signal(signal.SIGTERM, on_sigterm)

    if main:
        print(f"GPT {cfg.model}: {n_params / 1e6:.2f}M params, G={G} K={gcfg.codebook_size} grid={gcfg.grid} | "
              f"{n} items, {steps_per_epoch} steps/epoch, {total} steps | world {world} x batch {cfg.batch_size} x "
              f"accum {accum} = {cfg.global_batch_size} | {acc.distributed_type.value}"
              f"{f' ZeRO-{zero_stage}' if is_ds else ''} | precision {acc.mixed_precision}", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", disable=not main, dynamic_ncols=True)
    inject = {int(s) for s in cfg.inject_nan_at}
    engine = model if is_ds else None
    last_ckpt = None
    t_log, steps_since_log = time.perf_counter(), 0
    model.train()
    step = start
    stopped_by_signal = False
    while step < total:
        lr = lr_at(cfg, step, total)
        for g in base_groups:
            g["lr"] = lr
        stats = torch.zeros(2 + G, device=acc.device)  # [loss, group losses..., nonfinite micro-batches]
        skipped_before = engine.skipped_steps if is_ds else 0
        for m in range(accum):
            codes, labels = next(it)
            codes, labels = codes.to(acc.device, non_blocking=True), labels.to(acc.device, non_blocking=True)
            with acc.accumulate(model), acc.autocast():
                loss, group_losses = model(codes, labels)
                if step + 1 in inject and rank == 0 and m == 0:
                    loss = loss * float("nan")
                stats[0] += loss.detach().float() / accum
                stats[1:1 + G] += group_losses.detach().float() / accum
                stats[1 + G] += (~torch.isfinite(loss.detach())).float()
                acc.backward(loss)
        flag = torch.tensor([float(sigterm["got"])], device=acc.device)
        stats = torch.cat([stats, flag])
        if world > 1:
            stats = acc.reduce(stats, "sum")
        nonfinite = bool(stats[1 + G] > 0)
        if is_ds:  # the engine stepped inside backward(); it skips steps whose gradients are not finite
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
            skipped = engine.skipped_steps > skipped_before
            if nonfinite and not skipped:
                raise RuntimeError(f"step {step + 1}: non-finite loss but DeepSpeed applied the update")
        else:
            grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30))
            skipped = nonfinite or not math.isfinite(grad_norm)
            if not skipped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        steps_since_log += 1
        if skipped:
            state["skipped_steps"] += 1
            state["nonfinite_in_row"] += 1
            if main:
                print(f"step {step}: non-finite loss/gradients, update skipped "
                      f"({state['nonfinite_in_row']} in a row, {state['skipped_steps']} in total)", flush=True)
            if state["nonfinite_in_row"] >= cfg.max_nonfinite_in_row:
                bar.close()
                signal.signal(signal.SIGTERM, prev_handler)
                raise RuntimeError(
                    f"stopping: {state['nonfinite_in_row']} consecutive steps with a non-finite loss or gradient "
                    f"(steps {step - state['nonfinite_in_row'] + 1}..{step}). The weights are untouched since the last "
                    f"finite step; last checkpoint: {last_ckpt or (list_checkpoints(out) or ['none'])[-1]}. "
                    f"Lower lr, enable warmup_steps, or check the data.")
        else:
            state["nonfinite_in_row"] = 0
            if ema is not None:
                ema.update(acc.unwrap_model(model).gpt)
        state["step"] = step

        if step % cfg.log_every == 0 or step == total:
            dt = time.perf_counter() - t_log
            seqs = steps_since_log * cfg.global_batch_size
            rec = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": float(stats[0]) / world,
                   "group_losses": [float(x) / world for x in stats[1:1 + G]], "lr": lr, "grad_norm": grad_norm,
                   "skipped_steps": state["skipped_steps"], "tokens_per_s": seqs * L / dt, "seqs_per_s": seqs / dt,
                   "mfu": (fps * seqs / dt / (cfg.peak_tflops * 1e12 * world)) if cfg.peak_tflops else None}
            if main:
                clean = lambda v: v if v is None or math.isfinite(v) else None  # noqa: E731 (strict JSON)
                line = {k: ([clean(x) for x in v] if isinstance(v, list) else clean(v)) for k, v in rec.items()}
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
                if writer is not None:
                    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped_steps"):
                        if rec[k] is not None and math.isfinite(rec[k]):
                            writer.add_scalar(f"train/{k}", rec[k], step)
                    for g_i, v in enumerate(rec["group_losses"]):
                        writer.add_scalar(f"train/loss_group{g_i}", v, step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"mfu": f"{rec['mfu']:.3f}"} if rec["mfu"] is not None else {}))
            t_log, steps_since_log = time.perf_counter(), 0
        if bool(stats[-1] > 0):  # SIGTERM on any rank: every rank saves and stops
            last_ckpt = save(step)
            stopped_by_signal = True
            break
        if step % cfg.ckpt_every == 0 or step == total:
            last_ckpt = save(step)
        if cfg.sample_every and step % cfg.sample_every == 0 and step < total:
            sample(step)
            model.train()
        if step % cfg.log_every == 0:
            t_log = time.perf_counter()  # exclude checkpoint / sampling time from throughput
    bar.close()
    signal.signal(signal.SIGTERM, prev_handler)
    if stopped_by_signal:
        if main:
            print(f"SIGTERM: saved {last_ckpt} at step {step}; run the same command again to continue", flush=True)
        acc.end_training()
        return {"step": step, "stopped_by": "SIGTERM", "checkpoint": last_ckpt}

    sample(step)
    # ---- final eval on a fixed batch (the first items, epoch 0), then export and check the export
    model.eval()
    eval_items = EpochIndexed(ds).__getitems__([(0, i) for i in range(min(cfg.batch_size, n))])
    eval_codes = torch.stack([c for c, _ in eval_items]).to(acc.device)
    eval_labels = torch.stack([lb for _, lb in eval_items]).to(acc.device)
    with torch.no_grad(), acc.autocast():
        eval_loss = float(model(eval_codes, eval_labels)[0])
    final_dir = os.path.join(out, "final")
    ckpt_dir = last_ckpt or list_checkpoints(out)[-1]
    summary = {"step": step, "skipped_steps": state["skipped_steps"], "final_eval_loss": eval_loss,
               "eval_items": len(eval_items), "checkpoint": ckpt_dir, "num_parameters": n_params,
               "zero_stage": zero_stage, "world_size": world, "precision": acc.mixed_precision,
               # which tokenizer made the codes (shards' meta.json); `mgvq convert --from pipeline` checks it
               "tokenizer_sha256": (meta.get("tokenizer") or {}).get("weights_sha256")}
    acc.wait_for_everyone()
    if main:
        if is_ds:
            sd = _consolidate_deepspeed(ckpt_dir)
        else:
            sd = {k: v.detach().float().cpu() for k, v in acc.unwrap_model(model).gpt.state_dict().items()}
        export = GPT(gcfg, codebook=sd.get("codebook"))
        export.load_state_dict(sd, strict=True)
        export.save_pretrained(final_dir)
        export.eval()
        with torch.no_grad():
            summary["export_eval_loss"] = float(export.compute_loss(eval_codes.cpu(), eval_labels.cpu())["loss"])
        if acc.mixed_precision == "no" and abs(summary["export_eval_loss"] - eval_loss) > 1e-4 * max(1, eval_loss):
            raise RuntimeError(f"export check failed: the exported weights give eval loss "
                               f"{summary['export_eval_loss']:.6f} but the trained model {eval_loss:.6f}")
        if ema is not None:
            ema_model = GPT(gcfg, codebook=sd.get("codebook"))
            ema_model.load_state_dict({**sd, **ema.shadow}, strict=True)
            ema_model.save_pretrained(os.path.join(out, "final_ema"))
        with open(os.path.join(final_dir, "id2label.json"), "w") as f:
            json.dump({str(i): c for i, c in enumerate(meta.get("class_names", []))}, f, indent=2)
        _write_json(os.path.join(final_dir, "train_summary.json"), summary)
        print(f"done: step {step}, eval loss {eval_loss:.4f} (export {summary['export_eval_loss']:.4f}), "
              f"{state['skipped_steps']} skipped steps -> {final_dir}", flush=True)
    if writer is not None:
        writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    return summary


# ------------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m generator.train", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with TrainConfig fields (configs/generator/*.yaml)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for the MFU estimate (H100/H200 bf16 dense: 989, A100: 312)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=2e-4 max_steps=100 model_args.dim=512")
    args = p.parse_intermixed_args(argv)  # key=value may come before or after the flags
    overrides = list(args.overrides) + ([f"peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    summary = train(cfg)
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
