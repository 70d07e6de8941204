"""Config loading for every entry point: dataclass defaults <- YAML file <- `key=value` overrides (one parser, one
precedence rule). Dotted keys reach into dict fields (`loss.disc_start=100`, `model_overrides.vqgan.ch=16`).

    cfg = load_config(TrainConfig, "configs/generator/tiny.yaml", ["lr=2e-4", "model_overrides.dim=512"])

Values are YAML scalars (`[1,2]`, `null`, `true`), except that `1e-4`-style numbers (strings in YAML 1.1) become
floats; a float field given an int gets a float. Unknown keys fail with a did-you-mean hint. Renamed keys: a config
class may declare `RENAMED = {"old": "new"}` (and a `migrate(d)` classmethod for renames that are not one-to-one);
old names still work, with a deprecation message naming the new one.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from typing import Any


def parse_value(text: str) -> Any:
    """A command-line value: YAML, with `1e-3` (a string in YAML 1.1) read as a float."""
    import yaml

    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """['a=1', 'b.c=x'] -> [('a', 1), ('b.c', 'x')] (values through `parse_value`)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. lr=2e-4 or loss.disc_start=100)")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_value(v)))
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    """d['a']['b'] = value for key 'a.b' (creating nested dicts); dict values merge into dicts."""
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section (it holds {node[p]!r})")
        node = node[p]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            set_dotted(node[leaf], k, v)
    else:
        node[leaf] = list(value) if isinstance(value, tuple) else value


def deprecated(old: str, new: str, what: str) -> None:
    msg = f"{what}: `{old}` is deprecated, use `{new}` (the old name is still accepted for now)"
    warnings.warn(msg, FutureWarning, stacklevel=3)
    print(f"warning: {msg}", file=sys.stderr)


def _coerce(name: str, annotation: str, value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("null", "none", "~") and "None" in annotation:
        return None
    if "float" in annotation and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str) and "str" not in annotation:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a number") from None
    if annotation.startswith("int") and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    return value


def read_yaml(path: str | os.PathLike | None) -> dict:
    import yaml

    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {os.fspath(path)!r} not found")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a YAML mapping of config fields, got {type(d).__name__}")
    return d


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                what: str | None = None):
    """`cls` (a dataclass) from its defaults <- YAML `path` <- `overrides` (list of key=value, or a dict).

    Renamed keys are mapped in each layer first, so the precedence rule holds whichever name a layer uses."""
    what = what or f"{cls.__module__}.{cls.__name__}"
    d = rename_keys(cls, read_yaml(path), what)
    layer: dict = {}
    for k, v in (list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides)):
        set_dotted(layer, k, v)
    for k, v in rename_keys(cls, layer, what).items():
        set_dotted(d, k, v)
    return build_config(cls, d, what)


def rename_keys(cls, d: dict, what: str) -> dict:
    """One layer's old names -> new names (`cls.migrate(d)`, then `cls.RENAMED`), with a deprecation message."""
    d = dict(d)
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:
        d = migrate(d)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in d:
            deprecated(old, new, what)
            if new in d:
                raise ValueError(f"{what}: both `{old}` (deprecated) and `{new}` given; keep `{new}`")
            d[new] = d.pop(old)
    return d


def build_config(cls, d: dict, what: str | None = None):
    """`cls(**d)` after unknown-key checks and type coercion (keys already renamed)."""
    what = what or f"{cls.__module__}.{cls.__name__}"
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(types))
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, types, 1)) else u
                 for u in unknown]
        raise ValueError(f"{what}: unknown key(s): {', '.join(hints)}; valid keys: {sorted(types)}")
    return cls(**{k: _coerce(k, types[k], v) for k, v in d.items()})


def to_dict(cfg) -> dict:
    """A config dataclass as plain JSON/YAML-able data (tuples -> lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


# ---- the vocabulary both training stages share ---------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    """Fields every training stage has, with one name and one meaning (each stage's TrainConfig extends this and may
    change a default). Validation of these fields lives here too: `check()` from the subclass's __post_init__."""

    # model
    model: str = ""  # a preset name of the stage's model
    model_overrides: dict = dataclasses.field(default_factory=dict)  # config fields over the preset (dotted keys ok)
    init_from: str | None = None  # a save_pretrained folder to start from instead of the preset
    # data
    data: str = ""
    num_workers: int = 0
    batch_size: int = 32  # per process (per device micro-batch)
    steps: int | None = None  # total optimizer steps (else from epochs)
    # optimisation
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine floor
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (launcher's choice, else bf16 where supported, else fp32) | bf16 | fp16 | fp32
    ema: bool = False
    ema_decay: float = 0.9999
    max_nonfinite: int = 10  # non-finite steps in a row that stop the run
    seed: int = 0
    # run
    out_dir: str = "runs/run"
    resume: str | None = "auto"  # auto (newest checkpoint in out_dir, if any) | none | a checkpoint folder
    save_every: int = 1000  # checkpoint every N steps, and always at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: str = "tensorboard"  # tensorboard | wandb | mlflow | none (comma-separated for several)
    sample_every: int = 500

    def bad(self, name: str, valid: str):
        raise ValueError(f"training config: {name}={getattr(self, name)!r} is invalid; {valid}")

    def check(self) -> None:
        from .accel import PRECISIONS
        from .metrics import select_trackers
        from .optim import LR_SCHEDULES

        for name in ("batch_size", "log_every", "save_every", "keep_checkpoints", "max_nonfinite"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                self.bad(name, "must be an integer >= 1")
        for name in ("num_workers", "warmup_steps", "sample_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                self.bad(name, "must be an integer >= 0")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            self.bad("steps", "must be an integer >= 1 (or null)")
        if not self.lr > 0:
            self.bad("lr", "must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            self.bad("lr_schedule", f"valid: {', '.join(LR_SCHEDULES)}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            self.bad("betas", "must be two numbers in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.min_lr < 0:
            self.bad("weight_decay" if self.weight_decay < 0 else "grad_clip" if self.grad_clip < 0 else "min_lr",
                     "must be >= 0")
        if not 0 < self.ema_decay < 1:
            self.bad("ema_decay", "must be in (0, 1)")
        if self.precision in (False, "no"):  # YAML 1.1 reads a bare `no` as false; accelerate's spelling of fp32
            self.precision = "fp32"
        if self.precision not in PRECISIONS:
            self.bad("precision", f"valid: {', '.join(PRECISIONS)}")
        if self.resume in (None, ""):
            self.resume = "none"
        if not isinstance(self.model_overrides, dict):
            self.bad("model_overrides", "must be a mapping")
        select_trackers(self.log_with)
