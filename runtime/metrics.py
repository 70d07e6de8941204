"""Metric logging, one code path for both stages: `metrics.jsonl` (strict JSON, one line per logged step) plus the
experiment trackers of accelerate (`log_with`: tensorboard by default, wandb / mlflow when installed, or none)."""
from __future__ import annotations

import json
import math
import os

TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKER_DIR = "tb"  # tensorboard's event files go to <out_dir>/tb


def select_trackers(log_with: str | list | None) -> list[str]:
    """"tensorboard" | "wandb" | "mlflow" | "none" (or a comma list / list of them) -> tracker names, each checked
    to be installed. Raises ValueError naming the bad or missing one and what is valid."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    if log_with is None:
        return []
    names = log_with if isinstance(log_with, (list, tuple)) else [s.strip() for s in str(log_with).split(",")]
    names = [n for n in names if n and n != "none"]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    for n in names:
        if n not in available:
            raise ValueError(f"log_with={log_with!r}: unknown tracker {n!r}; valid: {', '.join(TRACKERS)}, none "
                             f"(or a comma-separated list)")
        if not available[n]():
            installed = [t for t in TRACKERS if available[t]()] or ["none"]
            raise ValueError(f"log_with={log_with!r}: {n} is not installed (pip install {n}); installed: "
                             f"{', '.join(installed)}; or log_with=none")
    return list(dict.fromkeys(names))


def _flat(prefix: str, v, out: dict) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), x, out)
    elif isinstance(v, (list, tuple)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and len(v) <= 64:
            for i, x in enumerate(v):
                out[f"{prefix}/{i}"] = x
    elif isinstance(v, bool):
        out[prefix] = int(v)
    elif isinstance(v, (int, float)) and math.isfinite(v):
        out[prefix] = v


def _hparams(config: dict) -> dict:
    flat: dict = {}
    for k, v in config.items():
        if isinstance(v, (int, float, str, bool)):
            flat[k] = v
        elif v is None:
            flat[k] = "None"
        else:
            flat[k] = json.dumps(v)
    return flat


class MetricLogger:
    """Main process only writes; every process may call. `log(record)` appends a line to metrics.jsonl and sends
    the finite numbers (lists as <key>/<i>) to the trackers under `<prefix>/`; `log_images` sends a uint8 NHWC batch."""

    def __init__(self, acc, out_dir: str | os.PathLike, trackers: list[str], config: dict | None = None,
                 prefix: str = "train"):
        self.acc, self.main, self.prefix = acc, acc.is_main_process, prefix
        self.path = os.path.join(os.fspath(out_dir), "metrics.jsonl")
        self.trackers = trackers
        if trackers:
            acc.init_trackers(TRACKER_DIR, config=_hparams(config or {}))

    def log(self, record: dict, step: int) -> None:
        if not self.main:
            return
        from .io import strict_json

        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(record)) + "\n")
        if self.trackers:
            scalars: dict = {}
            _flat("", {k: v for k, v in record.items() if k != "step"}, scalars)
            self.acc.log({f"{self.prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def log_images(self, name: str, images, step: int, png_path: str | None = None) -> None:
        """images: uint8 (N, H, W, 3) numpy array."""
        if not self.main:
            return
        for t in self.trackers:
            tracker = self.acc.get_tracker(t, unwrap=False)
            if t == "tensorboard":
                tracker.log_images({name: images}, step=step, dataformats="NHWC")
            elif t == "wandb":
                tracker.log_images({name: list(images)}, step=step)
            elif t == "mlflow" and png_path is not None:
                tracker.log_artifact(png_path)

    def close(self) -> None:
        """Finish the trackers (and end accelerate's run: its process group is released)."""
        self.acc.end_training()
        self.trackers = []
