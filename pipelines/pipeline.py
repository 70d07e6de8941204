"""`MGVQPipeline`: class label -> generator.generate -> sub-token indices -> tokenizer.decode -> images.

    pipe = MGVQPipeline.from_pretrained("runs/demo/pipeline")
    ids = pipe.get_label_ids(["sneaker", "bag"])
    images = pipe(ids, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images   # list of PIL

In the manner of diffusers' DiTPipeline. This is the only place (with the CLI) that wires the two stages together.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from generator import GPT, generate
from tokenizer import MGVQTokenizer

CONFIG_NAME = "pipeline_config.json"


@dataclass
class ImagePipelineOutput:
    images: Any  # list[PIL.Image] | np.ndarray (B, H, W, 3) in [0, 1] | torch.Tensor (B, 3, H, W) in [0, 1]
    codes: torch.Tensor | None = None  # (B, h, w, G) sampled sub-token indices


@dataclass
class SamplingDefaults:
    guidance_scale: float = 4.0
    temperature: float | list = 1.0
    top_k: int | list | None = None
    top_p: float | list | None = None
    cfg_interval: int | None = None
    groups_to_use: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingDefaults":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling defaults {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def check_compatible(tokenizer: MGVQTokenizer, generator: GPT) -> None:
    """Raise when the generator's sub-token layout does not match the tokenizer's (G, K, codebook)."""
    tc, gc = tokenizer.config, generator.config
    if tc.groups != gc.groups:
        raise ValueError(f"tokenizer has G={tc.groups} groups but the generator predicts G={gc.groups}")
    if tc.codebook_size != gc.codebook_size:
        raise ValueError(f"tokenizer has K={tc.codebook_size} codes per group but the generator has K={gc.codebook_size}")
    cb = getattr(generator, "codebook", None)
    if isinstance(cb, torch.Tensor) and cb.numel() > 0:
        want = tokenizer.codebook().reshape(-1, tokenizer.config.latent_dim // tokenizer.config.groups)
        if tuple(cb.shape) != tuple(want.shape):
            raise ValueError(f"generator's frozen codebook has shape {tuple(cb.shape)}, tokenizer's is {tuple(want.shape)}")


class MGVQPipeline:
    def __init__(self, tokenizer: MGVQTokenizer, generator: GPT, id2label: dict | Sequence[str] | None = None,
                 sampling_defaults: dict | SamplingDefaults | None = None):
        check_compatible(tokenizer, generator)
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        n = generator.config.num_classes
        if id2label is None:
            id2label = {i: str(i) for i in range(n)}
        elif not isinstance(id2label, dict):
            id2label = {i: str(name) for i, name in enumerate(id2label)}
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        if len(self.id2label) != n or set(self.id2label) != set(range(n)):
            raise ValueError(f"id2label must name exactly the generator's {n} classes 0..{n - 1}; "
                             f"got {len(self.id2label)} entries")
        # every comma-separated synonym maps to its id ("tench, Tinca tinca" -> both), case-insensitive
        self.labels: dict[str, int] = {}
        for i, names in self.id2label.items():
            for name in [names] + [s.strip() for s in names.split(",")]:
                self.labels.setdefault(name.lower(), i)
        if isinstance(sampling_defaults, SamplingDefaults):
            self.defaults = sampling_defaults
        else:
            self.defaults = SamplingDefaults.from_dict(sampling_defaults)

    # ---- properties --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.generator.config.grid * self.tokenizer.config.downsample

    def to(self, device=None, dtype=None) -> "MGVQPipeline":
        """Move both stages. dtype applies to the generator; the tokenizer decodes in float32 unless it is bf16/fp16
        and the device supports it (its BatchNorm / RMSNorm compute in fp32 anyway)."""
        self.generator.to(device=device, dtype=dtype)
        self.tokenizer.to(device=device)
        if dtype is not None and torch.device(device or self.device).type == "cuda":
            self.tokenizer.to(dtype=dtype)
        return self

    # ---- labels ------------------------------------------------------------------------------------------
    def get_label_ids(self, names: str | Sequence[str]) -> list[int]:
        if isinstance(names, str):
            names = [names]
        ids = []
        for name in names:
            key = str(name).strip().lower()
            if key not in self.labels:
                close = difflib.get_close_matches(key, list(self.labels), n=5, cutoff=0.5)
                hint = f" Close matches: {close}." if close else ""
                raise ValueError(f"unknown class name {name!r}.{hint} ({len(self.id2label)} classes; "
                                 f"see pipe.id2label)")
            ids.append(self.labels[key])
        return ids

    # ---- sampling ----------------------------------------------------------------------------------------
    def _validate(self, labels: list[int], guidance_scale, temperature, top_k, top_p, groups_to_use):
        n, G, K = self.generator.config.num_classes, self.generator.config.groups, self.generator.config.codebook_size
        bad = [l for l in labels if not 0 <= l < n]
        if bad:
            raise ValueError(f"class labels {bad[:10]} out of range: valid labels are 0..{n - 1}")
        if guidance_scale is None or float(guidance_scale) < 0:
            raise ValueError(f"guidance_scale={guidance_scale}: must be >= 0 (1.0 = no guidance)")

        def each(name, v):
            if isinstance(v, (list, tuple)):
                if len(v) != G:
                    raise ValueError(f"{name}={list(v)}: a per-group list needs G={G} values")
                return list(v)
            return [v]

        for k in each("top_k", top_k):
            if k is not None and (int(k) < 0 or int(k) > K):
                raise ValueError(f"top_k={k}: must be in 0..K={K} (None or 0 = off, 1 = greedy)")
        for p in each("top_p", top_p):
            if p is not None and not 0.0 < float(p) <= 1.0:
                raise ValueError(f"top_p={p}: must be in (0, 1] (None = off)")
        for t in each("temperature", temperature):
            if t is None or float(t) < 0:
                raise ValueError(f"temperature={t}: must be >= 0 (0 = greedy)")
        if groups_to_use is not None and not 1 <= int(groups_to_use) <= G:
            raise ValueError(f"groups_to_use={groups_to_use}: must be in 1..G={G} (None = all)")

    @torch.no_grad()
    def __call__(self, class_labels: int | str | Sequence[int | str], guidance_scale: float | None = None,
                 temperature: float | list | None = None, top_k: int | list | None = None,
                 top_p: float | list | None = None, cfg_interval: int | None = None,
                 groups_to_use: int | None = None, num_images_per_label: int = 1, batch_size: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 progress: bool = True):
        """Sample images for `class_labels` (ids or names); None settings fall back to the pipeline's defaults.

        temperature / top_k / top_p: one value for every sub-codebook or a list of G values (one per group).
        top_k is a COUNT of codes kept (None or 0 = off, 1 = greedy). MGVQ's released sampler (sample_c2i.py)
        takes it as log2 instead: its `--top-k 12` means top_k=2**12=4096 here (per group: [4096] * G).
        groups_to_use=k decodes from the first k sub-codebooks only (coarse-to-fine).
        """
        d = self.defaults
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        temperature = d.temperature if temperature is None else temperature
        top_k = d.top_k if top_k is None else top_k
        top_p = d.top_p if top_p is None else top_p
        cfg_interval = d.cfg_interval if cfg_interval is None else cfg_interval
        groups_to_use = d.groups_to_use if groups_to_use is None else groups_to_use
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: valid are 'pil', 'np', 'pt'")
        if isinstance(class_labels, (int, str)) or (isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0):
            class_labels = [class_labels]
        labels = [self.get_label_ids(l)[0] if isinstance(l, str) else int(l) for l in class_labels]
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label={num_images_per_label}: must be >= 1")
        labels = [l for l in labels for _ in range(num_images_per_label)]
        self._validate(labels, guidance_scale, temperature, top_k, top_p, groups_to_use)
        bs = batch_size or len(labels)
        if bs < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")

        codes, images = [], []
        chunks = [labels[i:i + bs] for i in range(0, len(labels), bs)]
        for chunk in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) == 1):
            y = torch.tensor(chunk, device=self.device)
            c = generate(self.generator, y, guidance_scale=float(guidance_scale), temperature=temperature,
                         top_k=top_k, top_p=top_p, cfg_interval=cfg_interval, generator=generator,
                         progress=progress and len(chunks) == 1)
            x = self.tokenizer.decode(c.to(next(self.tokenizer.parameters()).device), groups_to_use=groups_to_use)
            codes.append(c)
            images.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
        codes, images = torch.cat(codes), torch.cat(images)  # (B, h, w, G), (B, 3, H, W) in [0, 1]
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            from PIL import Image

            arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            images = [Image.fromarray(a) for a in arr]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images, codes=codes)

    # ---- persistence -------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
        self.generator.save_pretrained(os.path.join(out_dir, "generator"))
        cfg = {"id2label": {str(k): v for k, v in self.id2label.items()},
               "sampling_defaults": self.defaults.__dict__, "image_size": self.image_size}
        tmp = os.path.join(out_dir, CONFIG_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, **kwargs) -> "MGVQPipeline":
        """Load from a local folder (tokenizer/, generator/, pipeline_config.json) or a HuggingFace hub id."""
        if not os.path.isdir(path):
            if path.startswith((".", "/", "~")) or path.count("/") != 1:
                raise FileNotFoundError(f"pipeline folder {path!r} does not exist (hub ids look like 'user/name')")
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(path, **kwargs)
            except Exception as e:  # noqa: BLE001 - report both possibilities
                raise FileNotFoundError(f"{path!r} is neither a local pipeline folder nor a reachable hub repo: {e}") from e
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; a pipeline folder holds tokenizer/, generator/ and "
                                    f"{CONFIG_NAME} (write one with MGVQPipeline.save_pretrained)")
        with open(cfg_path) as f:
            cfg = json.load(f)
        tok = MGVQTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        gen = GPT.from_pretrained(os.path.join(path, "generator"))
        id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()} or None
        pipe = cls(tok, gen, id2label=id2label, sampling_defaults=cfg.get("sampling_defaults"))
        if device is not None or dtype is not None:
            pipe.to(device, dtype)
        return pipe
