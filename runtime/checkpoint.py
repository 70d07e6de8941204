"""Checkpoint folders and training state, without pickles.

A run folder holds `checkpoints/step_00000042/`, each written to `.tmp_step_00000042/` and renamed when complete
(atomic: a kill at any moment leaves either the old set or the new one). `train_state.json` is written last and marks
a checkpoint as complete; the newest `keep` are kept. A checkpoint holds the trainer's own state as safetensors + JSON:

  train_state.json              format, step, counters, run identity, config, names of the files below
  <name>.safetensors            model / EMA / discriminator weights (state dicts)
  <name>.optim.safetensors/json torch optimizer state: tensors in safetensors, the rest (param groups, scalars) in JSON
  rng_rank<r>.safetensors/json  each rank's torch (CPU + CUDA), Python and NumPy RNG states
  pytorch_model/                DeepSpeed ZeRO runs only: the engine's sharded checkpoint, in DeepSpeed's own format

Resuming reads only these files (safetensors + JSON): nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .io import load_tensors, read_json, save_tensors, write_bytes, write_json

STATE_FILE = "train_state.json"
FORMAT = "mgvq-train-state"
VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")


# ---- state dicts <-> safetensors + JSON --------------------------------------------------------------------------
def save_module(path_stem: str | os.PathLike, module: torch.nn.Module | dict) -> None:
    sd = module if isinstance(module, dict) else module.state_dict()
    save_tensors(f"{os.fspath(path_stem)}.safetensors", {k: v for k, v in sd.items() if torch.is_tensor(v)})


def load_module(path_stem: str | os.PathLike, module: torch.nn.Module, strict: bool = True) -> None:
    sd = load_tensors(f"{os.fspath(path_stem)}.safetensors")
    module.load_state_dict(sd, strict=strict)


def save_optimizer(path_stem: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Tensors of the optimizer state (moments, step counters) -> safetensors; param groups and scalars -> JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    save_tensors(f"{os.fspath(path_stem)}.optim.safetensors", tensors)
    write_json(f"{os.fspath(path_stem)}.optim.json", {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(path_stem: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    meta = read_json(f"{os.fspath(path_stem)}.optim.json")
    tensors = load_tensors(f"{os.fspath(path_stem)}.optim.safetensors")
    state: dict = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_rng(path_stem: str | os.PathLike) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    save_tensors(f"{os.fspath(path_stem)}.safetensors", tensors)
    write_json(f"{os.fspath(path_stem)}.json", {"python": [version, list(internal), gauss],
                                                "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                          float(cached)]}, indent=None)


def load_rng(path_stem: str | os.PathLike) -> None:
    tensors = load_tensors(f"{os.fspath(path_stem)}.safetensors")
    meta = read_json(f"{os.fspath(path_stem)}.json")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- the folder --------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def check_identity(saved: dict, now: dict, where: str) -> None:
    """Refuse to resume a checkpoint made by a different run (model, batch, seed, data...)."""
    for k, v in now.items():
        if json.dumps(saved.get(k), sort_keys=True) != json.dumps(v, sort_keys=True):
            raise ValueError(f"cannot resume from {where}: {k} differs (checkpoint: {saved.get(k)!r}, now: {v!r}); "
                             f"use a new out_dir= or resume=none")


class CheckpointFolder:
    """`<out_dir>/checkpoints`: list, resolve `resume=`, save atomically + rotate, read the newest state.

    `barrier` (e.g. accelerator.wait_for_everyone) separates the phases of a save when several processes write
    parts of one checkpoint; `main` says whether this process does the renames and rotation."""

    def __init__(self, out_dir: str | os.PathLike, keep: int = 2, main: bool = True,
                 barrier: Callable[[], None] = lambda: None):
        self.root = Path(out_dir) / "checkpoints"
        self.keep, self.main, self.barrier = keep, main, barrier

    def list(self) -> list[Path]:
        """Complete checkpoints (train_state.json present), oldest first. Any number of step digits is read."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def resolve(self, resume: str | None) -> Path | None:
        """resume: "auto" (newest here, if any) | "none" / None (start fresh) | a checkpoint folder."""
        if resume in (None, "none", ""):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume={resume!r}: not a checkpoint folder (no {STATE_FILE}); valid: 'auto', "
                                    f"'none' or a folder like {self.root / step_dir_name(1000)}")
        return path

    def read_state(self, ckpt: Path) -> dict:
        state = read_json(Path(ckpt) / STATE_FILE)
        if state.get("format") != FORMAT:
            raise ValueError(f"{ckpt}: written by an older version of this project (pickled accelerate state); it "
                             f"cannot be resumed without unpickling. Start a new run from its weights with "
                             f"init_from=<a final/ folder>, or use resume=none")
        return state

    def clean_partial(self) -> None:
        """Drop `.tmp_*` folders a killed run left behind (main process)."""
        if self.main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp_"):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, write: Callable[[Path], None], state: dict) -> Path:
        """Every process calls this; `write(tmp_dir)` writes this process's files; the main process then writes
        train_state.json (`state` + format), renames the folder into place and drops the oldest beyond `keep`."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{final.name}"
        if self.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        write(tmp)
        self.barrier()
        if self.main:
            write_json(tmp / STATE_FILE, {"format": FORMAT, "version": VERSION, "step": step, **state})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop metrics.jsonl lines logged after `step` (a crashed run's; they are recomputed identically on resume),
    and a torn last line."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(ln + "\n")
    write_bytes(path, "".join(keep).encode())
