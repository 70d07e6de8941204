"""A small CNN classifier trained on the real training images: the demo's honest, offline quality yardstick.

FID needs Inception weights that are not available offline, so the demo measures generated images with this
classifier instead: (a) class-conditional accuracy = fraction of samples classified as their conditioning class,
(b) a Fréchet distance between real test images and samples in the classifier's penultimate feature space
("classifier FD"; smaller is better, 0 for identical distributions). Neither is comparable to a paper's FID.

    clf, info = load_or_train(out_dir / "classifier", train_x, train_y, test_x, test_y)   # x: uint8 (N, H, W) or
    logits, feats = predict(clf, images01)                                                # float (N, 3, H, W) in [0, 1]

Input convention: float images (N, 3, H, W) in [0, 1] (what MGVQPipeline(output_type="pt") returns). The model
averages the three channels (Fashion-MNIST is greyscale), so greyscale-as-RGB inputs and true RGB inputs both work.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    image_size: int = 32
    width: int = 16  # channels of the first conv stage (the second has 2 * width)
    feature_dim: int = 128  # penultimate features (the Fréchet-distance space)


class SmallCNN(nn.Module):
    """2x2 average pool -> [conv, conv] -> max-pool -> [conv, conv] (BN + ReLU each) -> max-pool -> flatten -> fc -> fc.
    About 1.5M multiply-adds per 32x32 image (width 16): ~88-90% Fashion-MNIST test accuracy in a minute on 2 cores."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        w = c.width

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        if c.image_size % 8:
            raise ValueError(f"ClassifierConfig.image_size={c.image_size}: must be a multiple of 8")
        self.stages = nn.Sequential(nn.AvgPool2d(2), *conv(1, w), *conv(w, w), nn.MaxPool2d(2),
                                    *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * w * (c.image_size // 8) ** 2, c.feature_dim)  # flattened map keeps the layout
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3 or 1, H, W) in [0, 1] -> penultimate features (B, feature_dim) (after ReLU)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"classifier expects images (B, 3, H, W) or (B, 1, H, W) in [0, 1], got {tuple(x.shape)}")
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            raise ValueError(f"classifier was built for {self.config.image_size}px images, got {tuple(x.shape)}")
        x = x.float().mean(1, keepdim=True) * 2 - 1
        h = self.stages(x).flatten(1)
        return F.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---- data helpers ----------------------------------------------------------------------------------------------------
def to_float01(x) -> torch.Tensor:
    """uint8 (N, H, W) / (N, H, W, 3) / (N, 3, H, W) or float in [0, 1] -> float32 (N, C, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {tuple(x.shape)}")
    return x.contiguous()


@torch.no_grad()
def predict(model: SmallCNN, images, batch_size: int = 500, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [0, 1] (or uint8) -> (logits (N, classes), penultimate features (N, feature_dim))."""
    model.eval()
    device = device or next(model.parameters()).device
    x = to_float01(images)
    logits, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size].to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)


def accuracy(model: SmallCNN, images, labels, batch_size: int = 500) -> float:
    logits, _ = predict(model, images, batch_size)
    return float((logits.argmax(-1) == torch.as_tensor(labels).long()).float().mean())


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def classifier_fd(real_features, fake_features) -> float:
    """Fréchet distance between two sets of classifier features (evaluation.metrics.frechet_distance)."""
    from evaluation.metrics import frechet_distance

    return frechet_distance(*feature_stats(real_features), *feature_stats(fake_features))


class ClassifierFeatures:
    """A classifier as the feature net of `evaluation.sample.evaluate_samples` (kind "classifier"): uint8 (B, 3, H, W)
    batches -> (penultimate features, logits) float64, no spatial features. `mgvq evaluate-generation / compare
    --feature-net DIR` build one from a folder written by `save_classifier` (e.g. the demo's `classifier/`)."""

    kind = "classifier"

    def __init__(self, model: SmallCNN, weights_path: str, device="cpu", batch_size: int = 500):
        self.model = model.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.weights_path = Path(weights_path)
        self.name = f"classifier:{self.weights_path.parent}"
        self.num_classes = model.config.num_classes

    @classmethod
    def from_folder(cls, path: str, device="cpu", batch_size: int = 500) -> "ClassifierFeatures":
        model, _ = load_classifier(path, device)
        return cls(model, os.path.join(path, WEIGHTS_NAME), device, batch_size)

    def __call__(self, batches, spatial: bool = False):
        if torch.is_tensor(batches):
            batches = [batches]
        feats, logits = [], []
        for x in batches:
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"ClassifierFeatures: need uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if tuple(x.shape[-2:]) != (self.model.config.image_size,) * 2:
                raise ValueError(f"ClassifierFeatures: the classifier takes {self.model.config.image_size}px images, "
                                 f"got {tuple(x.shape[-2:])}; sample at that size (or --resize-to it)")
            lg, f = predict(self.model, x, self.batch_size, self.device)
            feats.append(f.double().numpy())
            logits.append(lg.double().numpy())
        if not feats:
            raise ValueError("ClassifierFeatures: no images")
        out = (np.concatenate(feats), np.concatenate(logits))
        return out + (None,) if spatial else out


# ---- training --------------------------------------------------------------------------------------------------------
def train_classifier(train_x, train_y, config: ClassifierConfig | None = None, steps: int = 1000,
                     batch_size: int = 128, lr: float = 5e-3, seed: int = 0, device="cpu",
                     progress: bool = True) -> tuple[SmallCNN, list[float]]:
    """AdamW + one-cycle cosine schedule, random horizontal flips and +-2 px shifts. Returns (model, loss per step)."""
    config = config or ClassifierConfig()
    x, y = to_float01(train_x), torch.as_tensor(np.asarray(train_y)).long()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (> 0): {len(x)} images, {len(y)} labels")
    if int(y.min()) < 0 or int(y.max()) >= config.num_classes:
        raise ValueError(f"labels must be in 0..{config.num_classes - 1}, got range {int(y.min())}..{int(y.max())}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = []
    perm, pos = torch.randperm(len(x), generator=g), 0
    for _ in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=1.0):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        xb, yb = x[idx], y[idx]
        flip = torch.rand(len(xb), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        xb = torch.roll(xb, (dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


def save_classifier(model: SmallCNN, path: str, info: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({"config": asdict(model.config), **(info or {})}, f, indent=2)


def load_classifier(path: str, device="cpu") -> tuple[SmallCNN, dict]:
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"classifier folder {path!r} lacks {os.path.basename(p)} (write it with save_classifier)")
    with open(cfg_path) as f:
        info = json.load(f)
    model = SmallCNN(ClassifierConfig(**info.pop("config")))
    model.load_state_dict(load_file(w_path, device=str(device)))
    return model.to(device).eval(), info


def load_or_train(path: str, train_x, train_y, test_x, test_y, config: ClassifierConfig | None = None,
                  steps: int = 1000, batch_size: int = 128, lr: float = 5e-3, seed: int = 0, device="cpu",
                  progress: bool = True) -> tuple[SmallCNN, dict]:
    """Reuse the classifier cached at `path` if it was trained with the same settings, else train and cache it.
    Returns (model, info) with info["test_accuracy"] measured on (test_x, test_y)."""
    config = config or ClassifierConfig()
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "num_train": int(len(train_y)),
                "num_test": int(len(test_y))}
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        model, info = load_classifier(path, device)
        if info.get("settings") == settings and asdict(model.config) == asdict(config):
            info["cached"] = True
            return model, info
    model, losses = train_classifier(train_x, train_y, config, steps, batch_size, lr, seed, device, progress)
    acc = accuracy(model, test_x, test_y)
    info = {"settings": settings, "test_accuracy": acc, "final_loss": float(np.mean(losses[-50:])),
            "losses": [float(v) for v in losses]}
    if not math.isfinite(info["final_loss"]):
        raise RuntimeError(f"classifier training diverged (final loss {info['final_loss']})")
    save_classifier(model, path, info)
    info["cached"] = False
    return model, info
