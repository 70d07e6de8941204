"""`MGVQPipeline`: class label -> generator.generate -> sub-token indices -> tokenizer.decode -> images.

    pipe = MGVQPipeline.from_pretrained("runs/demo/pipeline")          # a folder or a hub id ("user/name")
    ids = pipe.get_label_ids(["sneaker", "bag"])
    images = pipe(ids, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images   # list of PIL
    pipe.push_to_hub("user/mgvq-fashion", metrics="runs/eval/metrics.json")               # + a model card

In the manner of diffusers' DiTPipeline: `generator=` one torch.Generator or a list (one per image); every image
gets its own random stream (with one generator, image i's seed is its i-th draw), so an image does not change with
what else is in the batch or with batch_size. `pipe.to("cuda", torch.bfloat16)`, `pipe.to(torch.bfloat16)`;
`pipe.set_progress_bar_config(disable=True)`; the output is indexable and iterable like diffusers' outputs.
This is the only place (with the CLI) that wires the two stages together.

Text-conditional generators (GPTConfig.conditioning="text", e.g. `mgvq convert --from llamagen-gpt-t2i` or
`mgvq demo --text`) come with a T5 text encoder (pipelines.text_encoder, saved under text_encoder/):

    images = pipe(prompt=["a black ankle boot", "a bag"], negative_prompt="blurry", guidance_scale=4.0).images

With guidance and no negative_prompt the uncond half is the GPT's null caption under each prompt's own padding mask
(LlamaGen); a negative_prompt replaces it (with its own mask).
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from generator import GPT, generate
from runtime.fingerprint import check_same_tokenizer
from runtime.hub import METRICS_NAME, MGVQHubMixin, read_json, resolve_folder
from tokenizer import MGVQTokenizer

CONFIG_NAME = "pipeline_config.json"
CFG_SCHEDULES = ("constant", "linear")


@dataclass
class ImagePipelineOutput:
    """`out.images` / `out.codes`; like diffusers' BaseOutput also `out[0]` (the images), `out[1]` (the codes),
    `out["images"]`, and `images, codes = out`."""

    images: Any  # list[PIL.Image] | np.ndarray (B, H, W, 3) in [0, 1] | torch.Tensor (B, 3, H, W) in [0, 1]
    codes: torch.Tensor | None = None  # (B, h, w, G) sampled sub-token indices

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in {f.name for f in fields(self)}:
                raise KeyError(f"{key!r}; valid: {[f.name for f in fields(self)]}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class SamplingDefaults:
    guidance_scale: float = 4.0
    temperature: float | list = 1.0
    top_k: int | list | None = None
    top_p: float | list | None = None
    cfg_interval: int | None = None
    cfg_schedule: str = "constant"
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


def _number(name: str, v, valid: str, integer: bool = False) -> float:
    """v as a finite float (an integer when `integer`), else ValueError naming the setting and what is valid."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor, np.generic)):
        raise ValueError(f"{name}={v!r}: must be {valid}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}={v}: not a finite number; must be {valid}")
    if integer and f != int(f):
        raise ValueError(f"{name}={v}: not an integer; must be {valid}")
    return f


class MGVQPipeline(MGVQHubMixin, tags=["class-conditional", "image-generation"]):
    def __init__(self, tokenizer: MGVQTokenizer, generator: GPT, id2label: dict | Sequence[str] | None = None,
                 sampling_defaults: dict | SamplingDefaults | None = None, tokenizer_sha256: str | None = None,
                 text_encoder=None):
        """tokenizer_sha256: sha256 of the weights file of the tokenizer that made the generator's training codes
        (the shards' meta.json); saved in pipeline_config.json and checked by from_pretrained. None: not recorded.
        text_encoder: for a text-conditional generator, a pipelines.text_encoder.T5TextEncoder (prompts ->
        left-padded caption features + masks) whose width is the generator's caption_dim."""
        check_compatible(tokenizer, generator)
        self.text_encoder = text_encoder
        self.is_text = generator.config.conditioning == "text"
        if text_encoder is not None:
            gc = generator.config
            if not self.is_text:
                raise ValueError("text_encoder= is for text-conditional generators; this one is class-conditional")
            if text_encoder.dim != gc.caption_dim or text_encoder.max_length > gc.caption_tokens:
                raise ValueError(f"text encoder gives (max_length={text_encoder.max_length}, dim={text_encoder.dim}) "
                                 f"features; the generator takes caption_tokens={gc.caption_tokens} (>= max_length), "
                                 f"caption_dim={gc.caption_dim}")
        self._hub_mixin_config = None  # the folder's config is pipeline_config.json (no root config.json)
        self.tokenizer_sha256 = tokenizer_sha256
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        self.metrics: dict | None = None
        self._progress_bar_config: dict = {}
        n = generator.config.num_classes if not self.is_text else len(id2label or [])
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

    def to(self, *args, device=None, dtype=None) -> "MGVQPipeline":
        """Move both stages, as diffusers: `.to("cuda")`, `.to(torch.bfloat16)`, `.to("cuda", torch.bfloat16)`,
        `.to(device=..., dtype=...)`. dtype applies to the generator; the tokenizer takes it on CUDA only (on CPU it
        decodes in float32; its norms compute in fp32 anyway)."""
        for a in args:
            if isinstance(a, torch.dtype):
                if dtype is not None:
                    raise ValueError(f"to(): two dtypes given ({dtype}, {a})")
                dtype = a
            elif isinstance(a, (str, torch.device, int)):
                if device is not None:
                    raise ValueError(f"to(): two devices given ({device}, {a})")
                device = a
            else:
                raise ValueError(f"to(): {a!r} is neither a device ('cpu', 'cuda', torch.device) nor a torch.dtype")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"to(): dtype {dtype} is not a floating type; valid: torch.float32, torch.bfloat16, "
                             f"torch.float16")
        if device is not None:
            device = torch.device(device)
        self.generator.to(device=device, dtype=dtype)
        self.tokenizer.to(device=device)
        if self.text_encoder is not None and device is not None:  # T5 in bfloat16 on CUDA (frozen)
            self.text_encoder.model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
        if dtype is not None and (device or self.device).type == "cuda":
            self.tokenizer.to(dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm settings for the sampling progress bar, as diffusers (e.g. `disable=True`, `leave=False`)."""
        self._progress_bar_config = dict(kwargs)

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
    def _validate(self, labels: list[int], guidance_scale, temperature, top_k, top_p, groups_to_use,
                  cfg_interval=None, cfg_schedule="constant"):
        """Raise ValueError for any setting sampling would choke on (out of range, NaN / inf, wrong count)."""
        n, G, K = self.generator.config.num_classes, self.generator.config.groups, self.generator.config.codebook_size
        bad = [l for l in labels if not 0 <= l < n]
        if bad:
            raise ValueError(f"class labels {bad[:10]} out of range: valid labels are 0..{n - 1}")
        if guidance_scale is None or _number("guidance_scale", guidance_scale, "a finite number >= 0 (1.0 = no "
                                                                              "guidance)") < 0:
            raise ValueError(f"guidance_scale={guidance_scale}: must be >= 0 (1.0 = no guidance)")

        def each(name, v):
            if isinstance(v, (list, tuple)):
                if len(v) != G:
                    raise ValueError(f"{name}={list(v)}: a per-group list needs G={G} values")
                return list(v)
            return [v]

        for k in each("top_k", top_k):
            if k is not None and not 0 <= _number("top_k", k, f"an integer in 0..K={K}", integer=True) <= K:
                raise ValueError(f"top_k={k}: must be in 0..K={K} (None or 0 = off, 1 = greedy)")
        for p in each("top_p", top_p):
            if p is not None and not 0.0 < _number("top_p", p, "a number in (0, 1]") <= 1.0:
                raise ValueError(f"top_p={p}: must be in (0, 1] (None = off)")
        for t in each("temperature", temperature):
            if t is None or _number("temperature", t, "a finite number >= 0 (0 = greedy)") < 0:
                raise ValueError(f"temperature={t}: must be >= 0 (0 = greedy)")
        if groups_to_use is not None and not 1 <= _number("groups_to_use", groups_to_use, f"an integer in 1..G={G}",
                                                          integer=True) <= G:
            raise ValueError(f"groups_to_use={groups_to_use}: must be in 1..G={G} (None = all)")
        if cfg_interval is not None:
            _number("cfg_interval", cfg_interval, "an integer (-1 or None = every position)", integer=True)
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={cfg_schedule!r}: valid: {', '.join(map(repr, CFG_SCHEDULES))}")

    SAMPLING_SETTINGS = ("guidance_scale", "temperature", "top_k", "top_p", "cfg_interval", "cfg_schedule",
                         "groups_to_use")

    def sampling_settings(self, class_labels: Sequence[int | str] | None = None, **settings) -> dict:
        """The sampling settings a call would use (None -> the pipeline's default), checked now: raises ValueError
        naming a bad one (and a bad class label) before anything is sampled. Keys: SAMPLING_SETTINGS."""
        unknown = sorted(set(settings) - set(self.SAMPLING_SETTINGS))
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}; valid: {', '.join(self.SAMPLING_SETTINGS)}")
        d = self.defaults
        resolved = {k: getattr(d, k) if settings.get(k) is None else settings[k] for k in self.SAMPLING_SETTINGS}
        labels = [self.get_label_ids(l)[0] if isinstance(l, str) else int(l) for l in (class_labels or [])]
        self._validate(labels, **resolved)
        return resolved

    def sample_fn(self, compile: bool = False, **settings):
        """`sample_fn(labels (B,) int64, seeds list[int]) -> float (B, 3, H, W) in [0, 1]`, what evaluation.sample
        takes: image i gets its own generator seeded with seeds[i] (the same image whatever the batch or the number
        of processes). Settings as `sampling_settings` (checked now)."""
        kw = self.sampling_settings(**settings)

        def fn(labels: torch.Tensor, seeds: list) -> torch.Tensor:
            gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
            return self(labels.tolist(), generator=gens, output_type="pt", progress=False, compile=compile,
                        **kw).images

        return fn

    def _per_image_generators(self, generator, n: int) -> list[torch.Generator]:
        """One generator per image: the caller's list, or n generators on the pipeline's device seeded from n draws
        of one (or of the global RNG when None), so image i depends on draw i only."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"generator: a list needs one torch.Generator per image ({n} = labels x "
                                 f"num_images_per_label), got {len(generator)}")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError("generator: every list item must be a torch.Generator")
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator={generator!r}: must be a torch.Generator, a list of them, or None")
        dev = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2 ** 62, (n,), generator=generator, device=dev).tolist()
        return [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def encode_prompts(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (caption features (B, T, caption_dim), mask (B, T) bool) on the generator's device."""
        if not self.is_text:
            raise ValueError("prompt= needs a text-conditional generator; this pipeline is class-conditional: pass "
                             "class_labels (ids or names)")
        if self.text_encoder is None:
            raise ValueError("this text-conditional pipeline has no text encoder: pass text_encoder= (a "
                             "pipelines.text_encoder.T5TextEncoder) or call generator.generate with caption features")
        feats, mask = self.text_encoder([prompts] if isinstance(prompts, str) else list(prompts))
        return feats.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def __call__(self, class_labels: int | str | Sequence[int | str] | None = None, guidance_scale: float | None = None,
                 temperature: float | list | None = None, top_k: int | list | None = None,
                 top_p: float | list | None = None, cfg_interval: int | None = None, cfg_schedule: str | None = None,
                 groups_to_use: int | None = None, num_images_per_label: int = 1, batch_size: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, progress: bool = True, compile: bool = False,
                 prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None):
        """Sample images for `class_labels` (ids or names), or for a text-conditional generator for `prompt` (a string
        or a list; negative_prompt: one string or one per prompt); None settings fall back to the pipeline's defaults.

        temperature / top_k / top_p: one value for every sub-codebook or a list of G values (one per group).
        top_k is a COUNT of codes kept (None or 0 = off, 1 = greedy). MGVQ's released sampler (sample_c2i.py)
        takes it as log2 instead: its `--top-k 12` means top_k=2**12=4096 here (per group: [4096] * G).
        groups_to_use=k decodes from the first k sub-codebooks only (coarse-to-fine).
        cfg_schedule: "constant" or "linear" (guidance ramps from 1 to guidance_scale over the positions).
        generator: a torch.Generator (image i is seeded by its i-th draw) or a list with one per image.
        compile: torch.compile the decode step (generator.generate(compile=True); pays off on GPUs).
        progress: False (or set_progress_bar_config(disable=True)) hides the progress bar.
        """
        d = self.defaults
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        temperature = d.temperature if temperature is None else temperature
        top_k = d.top_k if top_k is None else top_k
        top_p = d.top_p if top_p is None else top_p
        cfg_interval = d.cfg_interval if cfg_interval is None else cfg_interval
        cfg_schedule = d.cfg_schedule if cfg_schedule is None else cfg_schedule
        groups_to_use = d.groups_to_use if groups_to_use is None else groups_to_use
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: valid are 'pil', 'np', 'pt'")
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label={num_images_per_label}: must be >= 1")
        conds = None  # text: per image (features, mask, negative features, negative mask)
        if prompt is not None or self.is_text:
            if class_labels is not None or prompt is None:
                raise ValueError("a text-conditional pipeline takes prompt= (not class_labels)" if self.is_text else
                                 "give class_labels or prompt=, not both")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if negative_prompt is not None:
                neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(neg) != len(prompts):
                    raise ValueError(f"negative_prompt: {len(neg)} prompts for {len(prompts)} prompts; give one string "
                                     f"or one per prompt")
            feats, mask = self.encode_prompts(prompts)
            rep = lambda t: t.repeat_interleave(num_images_per_label, 0)  # noqa: E731
            conds = [rep(feats), rep(mask), None, None]
            if negative_prompt is not None:
                nf, nm = self.encode_prompts(neg)
                conds[2:] = [rep(nf), rep(nm)]
            labels = [p for p in prompts for _ in range(num_images_per_label)]
            self._validate([], guidance_scale, temperature, top_k, top_p, groups_to_use, cfg_interval, cfg_schedule)
        else:
            if negative_prompt is not None:
                raise ValueError("negative_prompt= needs prompt= (a text-conditional generator)")
            if class_labels is None:
                raise ValueError("give class_labels (ids or names)")
            if isinstance(class_labels, (int, str)) or (isinstance(class_labels, torch.Tensor) and
                                                        class_labels.ndim == 0):
                class_labels = [class_labels]
            labels = [self.get_label_ids(l)[0] if isinstance(l, str) else int(l) for l in class_labels]
            labels = [l for l in labels for _ in range(num_images_per_label)]
            self._validate(labels, guidance_scale, temperature, top_k, top_p, groups_to_use, cfg_interval,
                           cfg_schedule)
        bs = batch_size or len(labels)
        if bs < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        gens = self._per_image_generators(generator, len(labels))

        show = progress and not self._progress_bar_config.get("disable", False)
        bar_cfg = {"desc": "sampling", **self._progress_bar_config}
        codes, images = [], []
        starts = range(0, len(labels), bs)
        for i in tqdm(starts, **{**bar_cfg, "disable": not show or len(starts) == 1}):
            if conds is None:
                y, kw = torch.tensor(labels[i:i + bs], device=self.device), {}
            else:
                f, m, nf, nm = (None if t is None else t[i:i + bs] for t in conds)
                y, kw = f, dict(cond_mask=m, negative_cond=nf, negative_cond_mask=nm)
            c = generate(self.generator, y, **kw, guidance_scale=float(guidance_scale), temperature=temperature,
                         top_k=top_k, top_p=top_p, cfg_interval=cfg_interval, cfg_schedule=cfg_schedule,
                         generator=gens[i:i + bs], compile=compile, progress=show and len(starts) == 1)
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

    # ---- persistence (save_pretrained / push_to_hub: runtime.hub.MGVQHubMixin, with a model card) -----------------
    def _save_pretrained(self, out_dir) -> None:
        out_dir = str(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
        # a tokenizer that changed since the codes were made (fine-tuned, cast) is refused now, not at the next load
        check_same_tokenizer(os.path.join(out_dir, "tokenizer"), self.tokenizer_sha256,
                             what="MGVQPipeline.tokenizer_sha256 (the generator's codes)")
        self.generator.save_pretrained(os.path.join(out_dir, "generator"))
        if self.text_encoder is not None:  # T5 weights + its tokenizer (tokenizer.json), loaded back offline
            self.text_encoder.save_pretrained(os.path.join(out_dir, "text_encoder"))
        cfg = {"id2label": {str(k): v for k, v in self.id2label.items()},
               "sampling_defaults": self.defaults.__dict__, "image_size": self.image_size}
        if self.tokenizer_sha256:
            cfg["tokenizer_sha256"] = self.tokenizer_sha256
        if self.text_encoder is not None:
            cfg["text_encoder"] = {"max_length": self.text_encoder.max_length}
        tmp = os.path.join(out_dir, CONFIG_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None, force_download: bool = False,
                        local_files_only: bool = False) -> "MGVQPipeline":
        """Load from a local folder (tokenizer/, generator/, pipeline_config.json) or a Hugging Face hub id."""
        path = resolve_folder(path, "pipeline", None, revision=revision, cache_dir=cache_dir, token=token,
                              force_download=force_download, local_files_only=local_files_only)
        path = os.path.abspath(path)
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; a pipeline folder holds tokenizer/, generator/ and "
                                    f"{CONFIG_NAME} (write one with MGVQPipeline.save_pretrained)")
        cfg = read_json(cfg_path)
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path} is damaged: it holds {type(cfg).__name__}, expected a JSON object")
        tok = MGVQTokenizer.from_pretrained(os.path.join(path, "tokenizer"))  # (a damaged file is reported first)
        # the tokenizer must be the one whose codes the generator learned (a swapped tokenizer/ decodes garbage)
        check_same_tokenizer(os.path.join(path, "tokenizer"), cfg.get("tokenizer_sha256"),
                             what=f"{cfg_path} (tokenizer_sha256, from the codes' meta.json)")
        gen = GPT.from_pretrained(os.path.join(path, "generator"))
        id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()} or None
        text_encoder = None
        if gen.config.conditioning == "text" and os.path.isdir(os.path.join(path, "text_encoder")):
            from pipelines.text_encoder import T5TextEncoder

            text_encoder = T5TextEncoder.from_pretrained(
                os.path.join(path, "text_encoder"), device="cpu", dtype=torch.float32,
                max_length=(cfg.get("text_encoder") or {}).get("max_length", gen.config.caption_tokens))
        pipe = cls(tok, gen, id2label=id2label, sampling_defaults=cfg.get("sampling_defaults"),
                   tokenizer_sha256=cfg.get("tokenizer_sha256"), text_encoder=text_encoder)
        if os.path.isfile(os.path.join(path, METRICS_NAME)):
            pipe.metrics = read_json(os.path.join(path, METRICS_NAME))
        if device is not None or dtype is not None:
            pipe.to(device, dtype)
        return pipe

    def _card(self, repo_id: str) -> dict:  # facts for the generated model card (runtime.hub.render_card)
        tc, gc, n = self.tokenizer.config, self.generator.config, len(self.id2label)
        if self.is_text:
            enc = self.text_encoder
            return dict(title="MGVQ text-to-image pipeline", summary=(
                f"Prompt -> T5 caption features -> GPT ({gc.groups} sub-tokens per position) -> MGVQ tokenizer "
                f"decoder -> {self.image_size}x{self.image_size} image."), facts={
                "tokenizer": f"{tc.backbone}, layout G x K = {tc.groups} x {tc.codebook_size}",
                "generator": f"GPT {gc.n_layer} x {gc.n_head} x {gc.dim}, caption {gc.caption_tokens} x "
                             f"{gc.caption_dim}, {self.generator.num_parameters() / 1e6:.2f} M parameters",
                "text encoder": f"T5, d_model {enc.dim}, max_length {enc.max_length}" if enc else "none",
                "tokenizer sha256": self.tokenizer_sha256},
                usage=f"from pipelines import MGVQPipeline\n\npipe = MGVQPipeline.from_pretrained({repo_id!r})\n"
                      f"pipe(prompt=[\"a bag\"], guidance_scale=4.0).images[0].save(\"sample.png\")")
        names = [self.id2label[i] for i in range(n)]
        shown = ", ".join(names[:20]) + (f", ... ({n} in all)" if n > 20 else "")
        d = {k: v for k, v in self.defaults.__dict__.items() if v is not None}
        ex = [repr(names[0]), "1" if n > 1 else "0"]
        return dict(title="MGVQ class-conditional image pipeline", summary=(
            f"Class label -> GPT ({gc.groups} sub-tokens per position) -> MGVQ tokenizer decoder -> "
            f"{self.image_size}x{self.image_size} image."), facts={
            "tokenizer": f"{tc.backbone}, layout G x K = {tc.groups} x {tc.codebook_size}, C = {tc.latent_dim}, "
                         f"downsample {tc.downsample}",
            "generator": f"GPT {gc.n_layer} layers x {gc.n_head} heads x {gc.dim}, "
                         f"{self.generator.num_parameters() / 1e6:.2f} M parameters, {gc.input_mode} input / "
                         f"{gc.head} head",
            "image size": f"{self.image_size} x {self.image_size} ({gc.grid} x {gc.grid} tokens)",
            "classes": f"{n}: {shown}",
            "sampling defaults": ", ".join(f"{k}={v}" for k, v in d.items()),
            "tokenizer sha256": self.tokenizer_sha256},
            usage=f"import torch\nfrom pipelines import MGVQPipeline\n\n"
                  f"pipe = MGVQPipeline.from_pretrained({repo_id!r})\n"
                  f"out = pipe([{', '.join(ex)}], generator=torch.Generator().manual_seed(0))  # class names or ids\n"
                  f"out.images[0].save(\"sample.png\")\n"
                  f"# command line: mgvq sample --pipeline {repo_id} --labels {ex[1]} --n 4 --out samples.png")
